"""The built-in task suite: math, choice, code (and text for perplexity), generated from a seed.

A registry: each task module gives `make(rng, split) -> (example, used_held_out_template)`,
`key(example)`, `prompt(...)` and `document(example)`. Splits are fixed by a hash of
each example's text, so train, validation and test never share an example, and
templates marked held-out only ever appear in test.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from . import choice, code, math
from .base import SPLITS, SUITE_VERSION, generate_split, stream

TASKS = {"math": math, "choice": choice, "code": code}


def examples(task: str, split: str = "test", n: int = 100, seed: int = 0) -> list[dict]:
    """n distinct examples of a built-in task's split (deterministic in `seed` and the suite version)."""
    if task == "ppl":
        return [{"text": t} for t in ppl_texts(split, n, seed)]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join([*TASKS, 'ppl'])}")
    mod = TASKS[task]
    return generate_split(mod.make, split, n, seed, mod.key)


def ppl_texts(split: str = "test", n: int = 100, seed: int = 0) -> list[str]:
    """Whole documents of all three categories, for perplexity."""
    per = -(-n // 3)
    docs = [TASKS[t].document(ex) for t in TASKS for ex in examples(t, split, per, seed + 17)]
    random.Random(seed).shuffle(docs)
    return docs[:n]


def training_documents(seed: int = 0, mix: dict[str, float] | None = None) -> Iterator[str]:
    """An endless, seeded stream of training documents from the train split of every task."""
    mix = mix or {"math": 0.5, "choice": 0.25, "code": 0.25}
    rng = random.Random(f"mix:{seed}")
    streams = {t: stream(TASKS[t].make, seed, TASKS[t].key) for t in mix}
    names, weights = list(mix), list(mix.values())
    while True:
        t = rng.choices(names, weights)[0]
        yield TASKS[t].document(next(streams[t]))


def export_jsonl(out_dir: str | Path, n: int = 500, seed: int = 0) -> list[Path]:
    """Write every task and split as JSONL (math in GSM8K format) and ppl text files; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, split in itertools.product(TASKS, SPLITS):
        path = out / f"{task}_{split}.jsonl"
        with path.open("w") as f:
            for ex in examples(task, split, n, seed):
                f.write(json.dumps(ex) + "\n")
        written.append(path)
    for split in SPLITS:
        path = out / f"ppl_{split}.txt"
        path.write_text("\n\n".join(ppl_texts(split, n, seed)) + "\n")
        written.append(path)
    return written


__all__ = ["SPLITS", "SUITE_VERSION", "TASKS", "examples", "export_jsonl", "ppl_texts", "training_documents"]
