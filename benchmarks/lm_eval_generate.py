"""lm-eval's `generate_until` through `--model roe` against `roe eval` on the same items, in one run.

Both sides load the same checkpoint in the same dtype with the same RoE settings, and generate greedily for the
same built-in math items with the same stop strings and token budget; the two alternate for `--rounds` rounds (after one warm-up batch each, so a
busy machine slows both alike) and the time per item of each round (wall clock) and the median ratio are
printed as JSON. `roe eval` batches 16 items; lm-eval's model
batches `--batch-size` requests (lm-eval's own default is 1). Issue 18's target: lm-eval within 1.5x.

    PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_eval_generate.py --items 16 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from lm_eval.api.instance import Instance

from roe import tasks
from roe.evaluate import STOPS, eval_math
from roe.harness import RoELM
from roe.tasks import math as math_task

MAX_NEW = 96  # roe eval's budget for math


def _requests(items: list[dict]) -> list[Instance]:
    gen = {"until": STOPS, "max_gen_toks": MAX_NEW, "do_sample": False}
    return [Instance("generate_until", ex, (math_task.prompt(ex["question"]), gen), i) for i, ex in enumerate(items)]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = RoELM(pretrained=args.model, num_samples=args.num_samples, dtype=args.dtype, batch_size=args.batch_size,
               max_gen_toks=MAX_NEW, device="cpu")
    roster = lm.roster
    items = tasks.examples("math", "test", args.items)
    warm = items[: min(4, len(items))]
    lm.generate_until(_requests(warm), disable_tqdm=True)
    eval_math(roster, warm)
    lm_s, eval_s = [], []
    for _ in range(args.rounds):
        lm_s.append(_timed(lambda: lm.generate_until(_requests(items), disable_tqdm=True)) / len(items))
        eval_s.append(_timed(lambda: eval_math(roster, items)) / len(items))
    print(json.dumps({
        "model": args.model, "dtype": str(roster.model.dtype), "num_samples": args.num_samples,
        "items": len(items), "lm_eval_batch_size": args.batch_size, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "lm_eval_s_per_item": [round(t, 3) for t in lm_s],
        "roe_eval_s_per_item": [round(t, 3) for t in eval_s],
        "median_ratio": round(statistics.median(a / b for a, b in zip(lm_s, eval_s)), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
