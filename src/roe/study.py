"""`roe study`: does RoE help this checkpoint on these tasks, beyond noise, and at what cost per token?

The paper's protocol in one command. For every task: tune the per-layer tau on the validation split with
Optuna's TPE (the first trial is tau = 0, the base model), evaluate the base model (K = 1) and the tuned RoE at
each K on the test split with several seeds, compare them item by item (`roe.stats`: the seed-mean per-item
difference with a bootstrap CI and a verdict), and measure the cost per token of every configuration in the
same run (`roe.bench.measure`: tokens/s, peak memory, stored KV cache). Writes study.json, study.md and PNG
plots (`roe.study_report`) into the output folder.

Resumable: every finished unit of work (a tuning trial, one (task, config, seed) evaluation, one cost
measurement) is recorded in `state.json` in the output folder under a key hashed from everything its result
depends on (model fingerprint, items, RoE config, settings, noise and suite versions). A rerun skips recorded
units; a changed setting changes the keys, so stale results are never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .evaluate import EVALUATORS, load_items

# The paper's settings per category (PAPER_NOTES: the OLMoE column; K is N there). ppl is tuned like math.
CATEGORY_DEFAULTS = {
    "math": dict(objective="ppl", trials=50, val_examples=100, max_tau=0.5, skip_layers=1),
    "choice": dict(objective="accuracy", trials=100, val_examples=300, max_tau=0.5, skip_layers=3),
    "code": dict(objective="accuracy", trials=50, val_examples=50, max_tau=0.5, skip_layers=1),
    "ppl": dict(objective="ppl", trials=50, val_examples=100, max_tau=0.5, skip_layers=1),
}
DEFAULT_K = 32
# Parameters the study can tune. "tau" is the per-layer vector; "adaptive_threshold" needs an RoEConfig with
# that field (adaptive K) and is refused with one line otherwise.
TUNABLE = ("tau", "adaptive_threshold")
STATE_VERSION = 1
EXPERT_PROMPTS = 8  # test prompts the experts read per decode step are averaged over (16 greedy steps each)


class StopStudy(Exception):
    """Raised when --max-units new units have been computed (the rest is left for a rerun)."""


@dataclass
class TaskSpec:
    name: str  # how the report names it
    category: str  # the evaluator: math, choice, code, ppl (lm-eval tasks: "lm-eval")
    test_items: list = field(default_factory=list, repr=False)
    val_items: list = field(default_factory=list, repr=False)
    source: str = "built-in"
    limit: int | None = None  # lm-eval: items of its test split
    include_path: str | None = None  # lm-eval: a folder of task YAMLs


class State:
    """The finished units, in `path` (JSON), written after every unit (atomically: a temporary file renamed)."""

    def __init__(self, path: Path, max_units: int | None = None):
        self.path, self.max_units = path, max_units
        self.units = {}
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("version") == STATE_VERSION:
                self.units = data["units"]
        self.computed = self.reused = 0

    @staticmethod
    def key(desc: dict) -> str:
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def get(self, desc: dict):
        rec = self.units.get(self.key(desc))
        return None if rec is None else rec["result"]

    def run(self, desc: dict, compute):
        """The recorded result of the unit `desc`, or compute() it, record it and save."""
        rec = self.get(desc)
        if rec is not None:
            self.reused += 1
            return rec
        if self.max_units is not None and self.computed >= self.max_units:
            raise StopStudy(f"stopped after {self.computed} new units (--max-units); rerun to continue")
        result = compute()
        self.units[self.key(desc)] = {"unit": desc, "result": result}
        self.computed += 1
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": STATE_VERSION, "units": self.units}))
        tmp.replace(self.path)
        return result


def fingerprint(roster, name: str) -> str:
    """A cheap identity of the weights: the config and the first values of every parameter."""
    import torch

    h = hashlib.sha256(name.encode())
    h.update(roster.model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for pname, p in roster.model.named_parameters():
            h.update(pname.encode())
            h.update(p.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def items_hash(items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_hash(path: str | None) -> str | None:
    """The contents of a folder's files (an lm-eval include path: its YAMLs and local data)."""
    if path is None:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def per_category(text: str | None, kind, name: str) -> dict:
    """'V' (every category) or 'cat=V,cat=V' -> {category or '*': value}."""
    if text is None:
        return {}
    out = {}
    for part in str(text).split(","):
        cat, eq, value = part.rpartition("=")
        try:
            out[cat.strip() if eq else "*"] = kind(value)
        except ValueError:
            raise ValueError(f"--{name}: {value!r} is not a {kind.__name__} (give V or category=V,...)") from None
    return out


def category_settings(args, category: str, n_layers: int) -> dict:
    """The paper's defaults for the category, the flags on top; notes say what was adjusted."""
    s = dict(CATEGORY_DEFAULTS.get(category, CATEGORY_DEFAULTS["math"]))
    notes = []
    for flag, kind in (("objective", str), ("trials", int), ("val_examples", int), ("max_tau", float),
                       ("skip_layers", int)):
        given = per_category(getattr(args, "study_" + flag), kind, flag.replace("_", "-"))
        if category in given or "*" in given:
            s[flag] = given.get(category, given.get("*"))
        elif flag == "skip_layers" and n_layers - 2 * s[flag] < 1:  # a paper default too large for this model
            s[flag] = max(0, (n_layers - 1) // 2)
            notes.append(f"skip_layers {CATEGORY_DEFAULTS[category]['skip_layers']} (the paper's) leaves no layer of "
                         f"{n_layers}: used {s[flag]}")
    if s["objective"] not in ("ppl", "accuracy"):
        raise ValueError(f"--objective must be ppl or accuracy, got {s['objective']!r}")
    if category == "ppl":
        s["objective"] = "ppl"
    if s["trials"] < 1 or s["val_examples"] < 1 or not s["max_tau"] > 0:
        raise ValueError("--trials and --val-examples must be >= 1 and --max-tau > 0")
    if n_layers - 2 * s["skip_layers"] < 1:
        raise ValueError(f"--skip-layers {s['skip_layers']} leaves no layer to tune (the model has {n_layers} MoE layers)")
    s["notes"] = notes
    return s


def tuned_parameters(text: str) -> list[str]:
    from .config import RoEConfig

    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in TUNABLE:
            raise ValueError(f"--tune: unknown parameter {n!r}; choose from {', '.join(TUNABLE)}")
        if n != "tau" and n not in RoEConfig.__dataclass_fields__:
            raise ValueError(f"--tune {n}: this roe has no RoEConfig.{n} (adaptive K is not in this version)")
    if "tau" not in names:
        raise ValueError("--tune must include tau")
    return names


@dataclass
class Study:
    """Everything one run shares: the roster, its settings, the state, the progress bar."""

    roster: object
    args: object
    fp: str
    state: State
    bar: object
    ks: list
    seeds: int
    variants: list = field(default_factory=list)  # adaptive K variants (study_adaptive.parse_variants)

    def versions(self) -> dict:
        from .routing import NOISE_VERSION
        from .tasks import SUITE_VERSION

        return {"noise": NOISE_VERSION, "suite": SUITE_VERSION}

    def full(self, desc: dict) -> dict:
        """A unit's description with what every unit's result depends on: the weights and the versions."""
        return {**desc, "model": self.fp, "versions": self.versions()}

    def unit(self, desc: dict, compute, label: str):
        self.bar.set_description(label[:60])
        try:
            return self.state.run(self.full(desc), compute)
        finally:
            self.bar.update(1)


def tune_task(st: Study, spec: TaskSpec, s: dict, tuned: list[str]) -> dict:
    """TPE over the middle layers' tau (and what else `tuned` names), one recorded unit per trial."""
    import optuna

    from .tune import scorer

    n = len(st.roster.routers)
    middle = list(range(s["skip_layers"], n - s["skip_layers"]))
    dists = {f"tau_{i}": optuna.distributions.FloatDistribution(0.0, s["max_tau"]) for i in middle}
    if "adaptive_threshold" in tuned:  # a place for adaptive K's threshold: a probability-like value in [0, 1]
        dists["adaptive_threshold"] = optuna.distributions.FloatDistribution(0.0, 1.0)
    score, direction = scorer(spec.category, s["objective"], spec.val_items)
    k = max(st.ks)
    desc = {"unit": "trial", "task": spec.name, "items": items_hash(spec.val_items), "objective": s["objective"],
            "k": k, "max_tau": s["max_tau"], "middle": middle, "tuned": tuned, "seed": st.args.tune_seed,
            "base_config": st.roster.config.replace(num_samples=1, tau=0.0).to_dict()}
    done = []  # the recorded trials, in order (trial i is recorded only after trials 0..i-1)
    while len(done) < s["trials"] and (rec := st.state.get(st.full({**desc, "trial": len(done)}))) is not None:
        done.append(rec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # seeded by the number of recorded trials, so a resumed search is as reproducible as an uninterrupted one
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=st.args.tune_seed + len(done)))
    for rec in done:
        study.add_trial(optuna.trial.create_trial(params=rec["params"], distributions=dists, value=rec["value"]))
    if not done:
        study.enqueue_trial({name: 0.0 for name in dists})  # the base model: the score to beat
    for i in range(s["trials"]):
        st.bar.set_postfix(best=f"{study.best_value:.4f}" if done else "-")

        def compute():
            trial = study.ask(dists)
            taus = [trial.params.get(f"tau_{j}", 0.0) for j in range(n)]
            extra = {p: trial.params[p] for p in trial.params if not p.startswith("tau_")}
            value = score(st.roster.with_config(num_samples=k, tau=taus, seed=st.args.tune_seed, **extra))
            study.tell(trial, value)
            return {"params": trial.params, "tau": taus, "extra": extra, "value": value}

        rec = st.unit({**desc, "trial": i}, compute, f"tune {spec.name} trial {i}")
        if i >= len(done):
            done.append(rec)
    st.bar.set_postfix()
    best = (min if direction == "minimize" else max)(done, key=lambda r: r["value"])  # ties: the earliest
    return {"tau": best["tau"], "extra": best["extra"], "validation_score": best["value"],
            "validation_score_base": done[0]["value"], "direction": direction, "objective": s["objective"],
            "trials": [{"tau": r["tau"], "value": r["value"]} for r in done], "settings": s,
            "validation_examples": len(spec.val_items), "k": k}


def score_items(roster, spec: TaskSpec, bar=None) -> dict:
    """One evaluation of the test items: per-item values (and weights for perplexity) and the task's metric."""
    if spec.category == "lm-eval":
        from .study_lm_eval import score_lm_eval

        return score_lm_eval(roster, spec)
    res = EVALUATORS[spec.category](roster, spec.test_items, bar.update if bar else (lambda n: None))
    if spec.category == "ppl":
        values, weights = [d["nll"] for d in res.details], [d["tokens"] for d in res.details]
        higher = False
    else:
        values, weights, higher = [float(d["correct"]) for d in res.details], None, True
    return {"metric": res.metric, "value": res.value, "values": values, "weights": weights,
            "higher_is_better": higher, "seconds": round(res.seconds, 3), "generated_tokens": res.generated_tokens}


def configs_for(st: Study, tau) -> list[tuple[str | None, dict]]:
    """(adaptive variant or None, config): the base model (K = 1, tau = 0, run once: it has no noise), RoE at
    every K and seed, and each adaptive K variant at the main K and every seed."""
    from .study_adaptive import label

    base = st.roster.config.replace(num_samples=1, tau=0.0, seed=0).to_dict()
    roe = [st.roster.config.replace(num_samples=k, tau=tau, seed=seed).to_dict()
           for k in st.ks for seed in range(st.seeds)]
    adaptive = [(label(v), st.roster.config.replace(num_samples=st.args.study_k, tau=tau, seed=seed, **v).to_dict())
                for v in st.variants for seed in range(st.seeds)]
    return [(None, base), *((None, c) for c in roe), *adaptive]


def evaluate_task(st: Study, spec: TaskSpec, tau, extra: dict) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for variant, cfg in configs_for(st, tau):
        cfg = {**cfg, **extra} if cfg["num_samples"] > 1 else cfg
        items = items_hash(spec.test_items) if spec.test_items else {"lm-eval": spec.name, "limit": spec.limit,
                                                                     "include": folder_hash(spec.include_path)}
        desc = {"unit": "eval", "task": spec.name, "category": spec.category, "items": items, "config": cfg}

        def compute(cfg=cfg):
            inner = tqdm(total=len(spec.test_items) or None, leave=False, desc=f"{spec.name} K={cfg['num_samples']}")
            try:
                changes = {k: v for k, v in cfg.items() if k in st.roster.config.__dataclass_fields__}
                return score_items(st.roster.with_config(**changes), spec, inner)
            finally:
                inner.close()

        label = f"eval {spec.name} K={cfg['num_samples']}{' ' + variant if variant else ''} seed={cfg['seed']}"
        rows.append({"k": cfg["num_samples"], "seed": cfg["seed"], "adaptive": variant,
                     **st.unit(desc, compute, label)})
    return rows


def cost_prompt(st: Study, spec: TaskSpec, item: int = 0):
    """The token ids [1, T] of the task's test prompt number `item` (what a decode step of this task sees)."""
    import torch

    from .tasks import TASKS

    text = "Question: How many apples are left?\nAnswer:"
    if len(spec.test_items) > item and spec.category in TASKS:
        ex = spec.test_items[item]
        text = TASKS[spec.category].prompt(ex["program"] if spec.category == "code" else ex["question"])
    elif len(spec.test_items) > item and spec.category == "ppl":
        text = spec.test_items[item]["text"]
    ids = st.roster.encode_prompt(text)[-st.args.bench_prompt_tokens:]
    return torch.tensor([ids], device=st.roster.model.device)


def measure_costs(st: Study, spec: TaskSpec, tau) -> list[dict]:
    """bench.measure for the base model, RoE at every K and each adaptive variant, one unit: a warm-up each, then
    --bench-repeats interleaved rounds (as `roe bench` does, so a shared machine's slow drift hits every
    configuration alike); the median; and the distinct experts each reads per MoE layer per decode step."""
    from dataclasses import asdict

    from .bench import _median_row, measure
    from .study_adaptive import experts_per_step, label

    prompt = cost_prompt(st, spec)
    # experts read: over several of the task's prompts (it depends on the tokens where adaptive K's gate is on)
    expert_prompts = [cost_prompt(st, spec, i) for i in range(min(EXPERT_PROMPTS, max(1, len(spec.test_items))))]
    ks = [1, *st.ks]
    configs = [(None, k, st.roster.with_config(num_samples=k, tau=tau if k > 1 else 0.0)) for k in ks]
    configs += [(label(v), st.args.study_k, st.roster.with_config(num_samples=st.args.study_k, tau=tau, **v))
                for v in st.variants]
    desc = {"unit": "cost", "task": spec.name, "ks": ks, "tau": configs[-1][2].config.to_dict()["tau"],
            "cache": st.roster.config.cache, "prompt": prompt.tolist(), "new_tokens": st.args.bench_tokens,
            "repeats": st.args.bench_repeats, "device": str(st.roster.model.device)}
    if st.variants:  # a study without them keeps its recorded cost unit
        desc["adaptive"] = [label(v) for v in st.variants]
        desc["expert_prompts"] = len(expert_prompts)

    def one(k, r, tokens):
        return measure(r, "base" if k == 1 else "roe", k, r.config.cache, prompt, tokens)

    def compute():
        for _, k, r in configs:
            one(k, r, 2)  # warm-up: lazy allocations, any compilation
        runs = [[] for _ in configs]
        for _ in range(st.args.bench_repeats):
            for i, (_, k, r) in enumerate(configs):
                runs[i].append(one(k, r, st.args.bench_tokens))
        fields = ("tokens_per_s", "ms_per_token", "peak_mem_bytes", "kv_cache_bytes", "repeats", "ms_per_token_min",
                  "ms_per_token_max", "compiled")
        return [{"k": k, "method": "base" if k == 1 else "roe", "adaptive": name,
                 "experts_per_layer_step": experts_per_step(r, expert_prompts),
                 **{f: asdict(_median_row(runs[i]))[f] for f in fields}} for i, (name, k, r) in enumerate(configs)]

    return st.unit(desc, compute, f"cost {spec.name}")


def compare(rows: list[dict], costs: list[dict], args) -> dict:
    """Per K: the quality over seeds and the paired per-item difference to the base model, next to the cost;
    then each adaptive K variant against the base model and the fixed K of matched cost (study_adaptive)."""
    import numpy as np

    from .stats import paired_difference
    from .study_adaptive import compare_variants

    base = next(r for r in rows if r["k"] == 1)
    cost = {c["k"]: c for c in costs if not c.get("adaptive")}
    out = {"metric": base["metric"], "higher_is_better": base["higher_is_better"], "n": len(base["values"]),
           "base": {"value": base["value"], "cost": cost.get(1)}, "roe": []}
    if base["weights"] is not None:
        out["difference_unit"] = "log-perplexity (nats per token), RoE minus base"
    else:
        out["difference_unit"] = f"{base['metric']} per item, RoE minus base"
    fixed = [r for r in rows if not r.get("adaptive")]
    for k in sorted({r["k"] for r in fixed} - {1}):
        group = sorted((r for r in fixed if r["k"] == k), key=lambda r: r["seed"])
        values = np.array([r["values"] for r in group]).T  # [items, seeds]
        diff = paired_difference(values, base["values"], base["weights"], args.level, base["higher_is_better"],
                                 args.bootstrap_resamples, seed=k)
        mean, std = statistics.fmean(r["value"] for r in group), (
            statistics.stdev(r["value"] for r in group) if len(group) > 1 else 0.0)
        out["roe"].append({"k": k, "value": mean, "std_over_seeds": std, "seeds": len(group),
                           "per_seed": [r["value"] for r in group], "difference": diff, "cost": cost.get(k)})
    if any(r.get("adaptive") for r in rows):
        out["adaptive"] = compare_variants(rows, out, {c["adaptive"]: c for c in costs if c.get("adaptive")}, args)
    return out


def task_specs(args) -> list[TaskSpec]:
    """Built-in tasks (--tasks), users' files (--file CAT=PATH, --val-file CAT=PATH), lm-eval tasks (--lm-eval)."""
    specs = []
    for name in [t.strip() for t in (args.tasks or "").split(",") if t.strip()]:
        if name not in EVALUATORS:
            raise ValueError(f"unknown built-in task {name!r}; choose from {', '.join(EVALUATORS)}")
        specs.append(TaskSpec(name, name, load_items(name, "test", args.test_examples)))
    vals = dict(_cat_path(v, "--val-file") for v in args.val_file or [])
    for text in args.file or []:
        cat, path = _cat_path(text, "--file")
        items = load_items(cat, "test", 10**9, path)
        if cat in vals:
            val = load_items(cat, "validation", 10**9, vals[cat])
            src = f"{path} (validation: {vals[cat]})"
        else:  # no validation file: the first half tunes, the second half is the test
            items, val = items[len(items) // 2 :], items[: len(items) // 2]
            src = f"{path} (first half: validation, second half: test)"
        specs.append(TaskSpec(Path(path).stem, cat, items[: args.test_examples], val, src))
    for name in [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]:
        specs.append(TaskSpec(name, "lm-eval", source=f"lm-eval (limit {args.test_examples})",
                              limit=args.test_examples, include_path=args.lm_eval_include))
    if not specs:
        raise ValueError("no tasks: give --tasks, --file or --lm-eval")
    if len({s.name for s in specs}) < len(specs):
        raise ValueError("two tasks have the same name: rename a file")
    return specs


def _cat_path(text: str, flag: str) -> tuple[str, str]:
    cat, eq, path = text.partition("=")
    if not eq or cat not in EVALUATORS:
        raise ValueError(f"{flag} takes CATEGORY=PATH with a category of {', '.join(EVALUATORS)}, got {text!r}")
    return cat, path


def ks_of(args) -> list[int]:
    k = args.study_k
    ks = [int(v) for v in args.ks.split(",")] if args.ks else sorted({max(2, k // 4), max(2, k // 2), k})
    if any(v < 2 for v in ks) or k not in ks:
        raise ValueError(f"--ks must be values >= 2 that include -k ({k}); K = 1 (the base model) is always run")
    return sorted(set(ks))


def run_study(args, roster) -> dict:
    """Every unit of the study (recorded or computed) and the comparison; raises StopStudy at --max-units."""
    from tqdm import tqdm

    from .study_adaptive import check_compatible, parse_variants

    specs, ks, n = task_specs(args), ks_of(args), len(roster.routers)
    tuned_names, variants = tuned_parameters(args.tune), parse_variants(args.adaptive)
    check_compatible(args, roster)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = {s.name: category_settings(args, s.category, n) for s in specs if s.category != "lm-eval"}
    for s in specs:
        if s.category != "lm-eval" and not s.val_items:
            s.val_items = load_items(s.category, "validation", settings[s.name]["val_examples"])
        elif s.name in settings:
            s.val_items = s.val_items[: settings[s.name]["val_examples"]]
    total = sum(settings[s.name]["trials"] if s.name in settings else 0 for s in specs)
    total += len(specs) * (1 + (len(ks) + len(variants)) * args.seeds + 1)
    bar = tqdm(total=total, desc="study", disable=args.no_progress)
    st = Study(roster, args, fingerprint(roster, args.model), State(out / "state.json", args.max_units), bar, ks,
               args.seeds, variants)
    result = {"tasks": {}, "tuning": {}}
    try:
        for spec in specs:
            if spec.name in settings:
                tuning = tune_task(st, spec, settings[spec.name], tuned_names)
            else:
                tuning = lm_eval_tuning(spec, result["tuning"], roster, args)
            result["tuning"][spec.name] = tuning
            rows = evaluate_task(st, spec, tuning["tau"], tuning.get("extra", {}))
            costs = measure_costs(st, spec, tuning["tau"])
            result["tasks"][spec.name] = {"category": spec.category, "source": spec.source, "rows": rows,
                                          "comparison": compare(rows, costs, args)}
    finally:
        bar.close()
    result["units"] = {"computed": st.state.computed, "reused": st.state.reused}
    result["model_fingerprint"], result["ks"] = st.fp, ks
    return result


def lm_eval_tuning(spec: TaskSpec, tuned: dict, roster, args) -> dict:
    """lm-eval tasks are not tuned here: they take the tau tuned for --lm-eval-tau-from, or the model's own."""
    source = args.lm_eval_tau_from
    if source:
        if source not in tuned:
            raise ValueError(f"--lm-eval-tau-from {source!r} is not a task tuned earlier in this study")
        return {"tau": tuned[source]["tau"], "extra": tuned[source].get("extra", {}), "from": source}
    return {"tau": list(roster.taus), "extra": {}, "from": "the model's RoE settings (not tuned)"}


def cmd_study(args) -> int:
    from .options import load_roster
    from .study_report import write_report

    args.study_k = args.k if args.k is not None else DEFAULT_K
    if args.seeds < 1 or args.test_examples < 2:
        raise ValueError("--seeds must be >= 1 and --test-examples >= 2 (a paired bootstrap needs 2 items)")
    roster = load_roster(args, k=args.study_k)
    start = time.time()
    try:
        result = run_study(args, roster)
    except StopStudy as e:
        print(e)
        return 3
    result["seconds"] = round(time.time() - start, 1)
    paths = write_report(result, args, roster)
    for name, task in result["tasks"].items():
        main = next(r for r in task["comparison"]["roe"] if r["k"] == args.study_k)["difference"]
        print(f"{name}: RoE K={args.study_k} minus base {main['mean']:+.4f} "
              f"[{main['ci_low']:+.4f}, {main['ci_high']:+.4f}] -> {main['verdict']}")
        for v in task["comparison"].get("adaptive", []):
            m = v.get("difference_vs_matched")
            print(f"{name}: adaptive K={v['k']} {v['variant']} minus fixed K={v['matched_k']} (matched cost) "
                  + (f"{m['mean']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}] -> {m['verdict']}" if m else "-"))
    print(f"units: {result['units']['computed']} computed, {result['units']['reused']} reused; wrote "
          + ", ".join(map(str, paths)))
    return 0 if all(math.isfinite(t["comparison"]["base"]["value"]) for t in result["tasks"].values()) else 1


def add_parser(sub) -> None:
    """`roe study`'s arguments, all in one place."""
    from .options import add_roe_options

    p = sub.add_parser("study", help="does RoE help? tune, test against the base model with paired CIs, cost")
    add_roe_options(p)  # --tau / --skip-layers / --profile: the untuned RoE of lm-eval tasks (see --lm-eval-tau-from)
    p.add_argument("--tasks", default="math,choice,code,ppl",
                   help="built-in tasks, comma-separated (empty: only --file / --lm-eval tasks)")
    p.add_argument("--file", action="append", metavar="CAT=PATH", help="your own test items (as `roe eval --file`), "
                   "CAT one of math, choice, code, ppl; repeatable")
    p.add_argument("--val-file", action="append", metavar="CAT=PATH",
                   help="validation items for --file's category (default: the first half of the --file)")
    p.add_argument("--lm-eval", help="lm-eval task names, comma-separated (evaluated through the `roe` lm-eval model)")
    p.add_argument("--lm-eval-include", help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--lm-eval-tau-from", help="the study task whose tuned tau the lm-eval tasks use")
    p.add_argument("--ks", help=f"K values for quality vs K, comma-separated, including -k (default {DEFAULT_K}: "
                   "K/4, K/2, K)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--test-examples", type=int, default=100)
    per = "V for every category or cat=V,cat=V (default: the paper's per category)"
    p.add_argument("--trials", dest="study_trials", metavar="V", help=f"TPE trials; {per}")
    p.add_argument("--val-examples", dest="study_val_examples", metavar="V", help=f"validation items; {per}")
    p.add_argument("--objective", dest="study_objective", metavar="V", help=f"ppl or accuracy; {per}")
    p.add_argument("--max-tau", dest="study_max_tau", metavar="V", help=f"largest tau; {per}")
    p.add_argument("--tune-skip-layers", dest="study_skip_layers", metavar="V", help=f"clean MoE layers at each end; {per}")
    p.add_argument("--tune", default="tau", help=f"parameters to tune, comma-separated, of: {', '.join(TUNABLE)}")
    p.add_argument("--adaptive", metavar="METRIC:THRESHOLD[,...]",
                   help="adaptive K variants (entropy:0.5,margin:0.9) run at -k with the tuned tau and compared "
                        "with fixed K at matched cost (experts read per decode step); clean cache")
    p.add_argument("--tune-seed", type=int, default=0, help="the TPE sampler's and the tuning noise's seed")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals and verdicts")
    p.add_argument("--bootstrap-resamples", type=int, default=9999)
    p.add_argument("--bench-tokens", type=int, default=32, help="decoded tokens per cost measurement")
    p.add_argument("--bench-prompt-tokens", type=int, default=64, help="prompt tokens of the cost measurement (at most)")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--max-units", type=int, help="stop after this many new units of work (rerun to continue)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", default="roe-study", help="output folder (report, plots, resumable state)")
    p.set_defaults(func=cmd_study)
