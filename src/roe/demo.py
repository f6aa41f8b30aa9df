"""`roe demo` (what `make demo` runs): RoE on the built-in model, every number measured in this run."""

from __future__ import annotations

import time

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from . import tasks
from .evaluate import EVALUATORS, load_items
from .roster import RosterOfExperts
from .tasks import math as math_task


def cmd_demo(args) -> int:
    console = Console(width=120)
    start = time.perf_counter()
    roe = RosterOfExperts.from_pretrained("builtin")  # ships with its tuned RoE profile
    base = roe.with_config(num_samples=1)
    larger = RosterOfExperts.from_pretrained("builtin:m").with_config(num_samples=1)
    c = roe.config
    console.print(f"[bold]builtin:s[/] OLMoE, {sum(p.numel() for p in roe.model.parameters()) / 1e6:.1f}M parameters, "
                  f"{len(roe.routers)} MoE layers x {roe.num_experts[0]} experts; RoE profile: K={c.num_samples}, "
                  f"tau={list(c.tau)}, cache={c.cache}, aggregate={c.aggregate}")
    systems = [("builtin:s base (K=1)", base), (f"builtin:s RoE (K={c.num_samples})", roe),
               ("builtin:m base (K=1)", larger)]
    table = Table(title=f"Test split, first {args.limit} items per category (seed {c.seed})")
    table.add_column("system")
    for task in ("math", "choice", "code"):
        table.add_column(f"{task} acc", justify="right")
    table.add_column("gen tok/s", justify="right")
    items = {t: load_items(t, "test", args.limit) for t in ("math", "choice", "code")}
    for name, roster in systems:
        results = {t: EVALUATORS[t](roster, items[t]) for t in items}
        tokens = sum(r.generated_tokens for r in results.values())
        seconds = sum(r.seconds for t, r in results.items() if t != "choice")
        table.add_row(name, *(f"{results[t].value:.3f}" for t in items), f"{tokens / seconds:.0f}")
        console.print(f"  measured {name}", style="dim")
    console.print(table)

    ex = tasks.examples("math", "test", args.limit)[args.example]
    prompt = math_task.prompt(ex["question"])
    console.print(Panel(ex["question"], title="A worked problem (test split)"))
    for name, roster in systems[:2]:
        out = roster.generate(prompt, max_new_tokens=96, stop=["\n\n", "\nQuestion:"])[0]
        mark = "right" if math_task.final_answer(out) == math_task.final_answer(ex["answer"]) else "wrong"
        console.print(Panel(out.strip(), title=f"{name}: {mark}"))
    console.print(f"reference answer: {math_task.final_answer(ex['answer'])}; demo took {time.perf_counter() - start:.0f}s")
    return 0


def add_parser(sub) -> None:
    from .parsers import add_demo

    add_demo(sub)

