"""Task metrics under RoE and `roe eval`.

math: exact match of the `#### N` answer after greedy generation (GSM8K convention)
choice: the option with the highest log-probability after the prompt (the paper's commonsense metric)
code: exact match of the generated output against the program's real output (pass@1)
ppl: perplexity of whole documents
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import tasks
from .tasks import code as code_task
from .tasks import math as math_task

GEN_BATCH = 16
STOPS = ["\n\n", "\nQuestion:", "<|endoftext|>"]


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    n: int
    seconds: float
    generated_tokens: int = 0
    details: list = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds and self.generated_tokens else float("nan")


def _batched(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _generate(roster, prompts, max_new_tokens, progress):
    outs = []
    for batch in _batched(prompts, GEN_BATCH):
        outs += roster.generate_completions(batch, max_new_tokens=max_new_tokens, stop=STOPS)
        progress(len(batch))
    return outs


def eval_math(roster, items, progress=lambda n: None) -> TaskResult:
    start = time.perf_counter()
    outs = _generate(roster, [math_task.prompt(ex["question"]) for ex in items], 96, progress)
    right = [math_task.final_answer(o.text) == math_task.final_answer(ex["answer"]) for o, ex in zip(outs, items)]
    details = [{"question": ex["question"], "output": o.text, "correct": r} for ex, o, r in zip(items, outs, right)]
    return TaskResult("math", "accuracy", sum(right) / len(items), len(items), time.perf_counter() - start,
                      sum(len(o.token_ids) for o in outs), details)


def eval_code(roster, items, progress=lambda n: None) -> TaskResult:
    start = time.perf_counter()
    outs = _generate(roster, [code_task.prompt(ex["program"]) for ex in items], 24, progress)
    # built-in items carry the output of really running the program; a user's file is never executed
    right = [o.text.strip() == ex["output"].strip() for o, ex in zip(outs, items)]
    details = [{"program": ex["program"], "output": o.text, "correct": r} for ex, o, r in zip(items, outs, right)]
    return TaskResult("code", "pass@1", sum(right) / len(items), len(items), time.perf_counter() - start,
                      sum(len(o.token_ids) for o in outs), details)


def eval_choice(roster, items, progress=lambda n: None) -> TaskResult:
    start = time.perf_counter()
    right, details = [], []
    for ex in items:
        ctx = tasks.choice.prompt(ex["question"])
        scores = roster.score([ctx] * len(ex["choices"]), [" " + c for c in ex["choices"]])
        right.append(max(range(len(scores)), key=scores.__getitem__) == ex["answer"])
        details.append({"question": ex["question"], "scores": scores, "correct": right[-1]})
        progress(1)
    return TaskResult("choice", "accuracy", sum(right) / len(items), len(items), time.perf_counter() - start,
                      details=details)


def eval_ppl(roster, items, progress=lambda n: None) -> TaskResult:
    """Perplexity over all documents; details: each document's summed negative log-prob and token count (what a
    paired per-document comparison needs). The same pairs and scores as `RosterOfExperts.perplexity`."""
    start = time.perf_counter()
    pairs = []
    for ex in items:
        ids = roster.encode_prompt(ex["text"])
        if len(ids) < 2:
            raise ValueError(f"text {ex['text'][:40]!r} has fewer than 2 tokens: perplexity needs a predicted token")
        pairs.append((ids[:1], ids[1:]))
    lps = roster.token_logprobs(pairs)
    details = [{"nll": -float(lp.sum()), "tokens": lp.numel()} for lp in lps]
    ppl = math.exp(sum(d["nll"] for d in details) / sum(d["tokens"] for d in details))
    progress(len(items))
    return TaskResult("ppl", "perplexity", ppl, len(items), time.perf_counter() - start, details=details)


EVALUATORS: dict[str, Callable] = {"math": eval_math, "choice": eval_choice, "code": eval_code, "ppl": eval_ppl}


def load_items(task: str, split: str = "test", limit: int = 100, path: str | None = None) -> list[dict]:
    """Built-in items, or a user's JSONL (math: question/answer; choice: question/choices/answer) or text file (ppl)."""
    if path is None:
        return tasks.examples(task, split, limit)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"task file not found: {p}")
    if task == "ppl":
        texts = [t.strip() for t in p.read_text().split("\n\n") if t.strip()]
        return [{"text": t} for t in texts[:limit]]
    required = {"math": {"question": str, "answer": str}, "choice": {"question": str, "choices": list, "answer": int},
                "code": {"program": str, "output": str}}[task]
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        for name, kind in required.items():
            if name not in item:
                raise ValueError(f"{p}:{n}: missing field '{name}' (a {task} item needs {', '.join(required)})")
            if not isinstance(item[name], kind) or isinstance(item[name], bool):
                raise ValueError(f"{p}:{n}: field '{name}' must be a {kind.__name__}")
        if task == "math" and math_task.final_answer(item["answer"]) is None:
            raise ValueError(f"{p}:{n}: field 'answer' has no final '#### N' line")
        if task == "choice" and not 0 <= item["answer"] < len(item["choices"]):
            raise ValueError(f"{p}:{n}: field 'answer' is {item['answer']} but there are {len(item['choices'])} choices")
        items.append(item)
        if len(items) == limit:
            break
    if not items:
        raise ValueError(f"{p}: no items")
    return items


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_eval(roster, task_names, ks, seeds, split, limit, paths=None, progress_factory=None,
             items_by_task: dict | None = None) -> list[dict]:
    """Every (task, K, seed): one row each. K = 1 is the base model (no seed dependence, run once).
    items_by_task: items already loaded (by `load_items`), used instead of loading them again."""
    rows = []
    paths = paths or {}
    for task in task_names:
        items = (items_by_task or {}).get(task) or load_items(task, split, limit, paths.get(task))
        for k in ks:
            for seed in (range(seeds) if k > 1 else [0]):
                r = roster.with_config(num_samples=k, seed=seed)
                bar = progress_factory(f"{task} K={k} seed={seed}", len(items)) if progress_factory else None
                try:
                    res = EVALUATORS[task](r, items, bar.update if bar else (lambda n: None))
                finally:
                    if bar:
                        bar.close()
                rows.append({"task": task, "k": k, "seed": seed, "metric": res.metric, "value": res.value, "n": res.n,
                             "seconds": round(res.seconds, 2), "tokens_per_s": None if math.isnan(res.tokens_per_s) else round(res.tokens_per_s, 1)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = {}
    for row in rows:
        out.setdefault((row["task"], row["k"]), []).append(row)
    table = []
    for (task, k), group in out.items():
        mean, std = mean_std([g["value"] for g in group])
        table.append({"task": task, "k": k, "metric": group[0]["metric"], "mean": mean, "std": std, "seeds": len(group),
                      "n": group[0]["n"]})
    return table


def cmd_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .options import load_roster
    from .progress import progress

    ks = [int(k) for k in (args.k or "1,8").split(",")]
    if any(k < 1 for k in ks):
        raise ValueError("every K must be >= 1")
    names = list(EVALUATORS) if args.task == "all" else args.task.split(",")
    for n in names:
        if n not in EVALUATORS:
            raise ValueError(f"unknown task {n!r}; choose from {', '.join(EVALUATORS)} or all")
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    items = {n: load_items(n, args.split, args.limit, args.file) for n in names}  # bad files fail before loading
    roster = load_roster(args, k=max(ks))
    rows = []
    try:
        rows = run_eval(roster, names, ks, args.seeds, args.split, args.limit,
                        progress_factory=lambda d, n: progress(total=n, desc=d, leave=False), items_by_task=items)
    except KeyboardInterrupt:
        print("interrupted: reporting the runs that finished")
    finally:
        counts = ", ".join(f"{n} {len(v)}" for n, v in items.items()) if len(items) > 1 else len(items[names[0]])
        source = args.file if args.file else f"built-in {args.split} split"
        table = Table(title=f"roe eval: {args.model} ({source}, {counts} items, tau={roster.config.tau})")
        for col in ("task", "K", "metric", "mean", "std", "seeds"):
            table.add_column(col)
        for r in summarize(rows):
            table.add_row(r["task"], str(r["k"]), r["metric"], f"{r['mean']:.4f}", f"{r['std']:.4f}", str(r["seeds"]))
        Console(width=160).print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"config": roster.config.to_dict(), "model": args.model,
                                                   "rows": rows, "summary": summarize(rows)}, indent=1))
    return 0


def add_parser(sub) -> None:
    from .options import add_roe_options

    p = sub.add_parser("eval", help="evaluate base (K=1) against RoE on a task")
    add_roe_options(p, k_list=True)
    p.add_argument("--task", default="all", help="math, choice, code, ppl, comma-separated, or all")
    p.add_argument("--file", help="your own JSONL (math/choice/code) or text file (ppl) instead of the built-in items")
    p.add_argument("--split", default="test", choices=tasks.SPLITS)
    p.add_argument("--limit", type=int, default=100, help="items per task at most, the first ones (default: 100)")
    p.add_argument("--seeds", type=int, default=5, help="RoE seeds per K > 1; the table gives their mean and std")
    p.add_argument("--json", help="write rows and summary as JSON")
    p.set_defaults(func=cmd_eval)
