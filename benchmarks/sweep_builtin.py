"""Choose the built-in default model's RoE profile on the validation split: a uniform-tau sweep.

    python benchmarks/sweep_builtin.py --size s -k 8 --limit 96

Writes src/roe/builtin_models/<size>/roe_profile.json (the profile `builtin` uses) and prints the sweep.
The objective is validation math accuracy (greedy), ties broken by validation perplexity.
"""

import argparse
import json
import platform
import sys
import time

import torch
import transformers

from roe import RoEConfig, RosterOfExperts, builtin_path
from roe.evaluate import eval_math, eval_ppl, load_items
from roe.routing import layer_taus

p = argparse.ArgumentParser()
p.add_argument("--size", default="s")
p.add_argument("-k", type=int, default=8)
p.add_argument("--limit", type=int, default=96)
p.add_argument("--taus", default="0,0.05,0.1,0.2,0.3,0.5")
p.add_argument("--skip-layers", type=int, default=1)
args = p.parse_args()

path = builtin_path(args.size)
base = RosterOfExperts.from_pretrained(path, roe=RoEConfig(num_samples=args.k, tau=0.0, skip_layers=args.skip_layers))
math_items = load_items("math", "validation", args.limit)
ppl_items = load_items("ppl", "validation", args.limit)
rows = []
for tau in [float(t) for t in args.taus.split(",")]:
    r = base.with_config(tau=tau)
    t0 = time.perf_counter()
    acc = eval_math(r, math_items).value
    ppl = eval_ppl(r, ppl_items).value
    rows.append({"tau": tau, "math_accuracy": acc, "ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)
best = max(rows, key=lambda r: (r["math_accuracy"], -r["ppl"]))
n_moe = len(base.routers)
profile = {
    "model": f"builtin:{args.size}",
    "num_samples": args.k,
    "tau": layer_taus(best["tau"], args.skip_layers, n_moe),
    "aggregate": "probs",
    "cache": "clean",
    "objective": "validation math accuracy (greedy), ties by validation perplexity",
    "validation_score": best["math_accuracy"],
    "validation_examples": args.limit,
    "method": "uniform tau sweep",
    "sweep": rows,
    "versions": {"roe": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version()},
}
(path / "roe_profile.json").write_text(json.dumps(profile, indent=1) + "\n")
print("profile:", json.dumps({k: profile[k] for k in ("num_samples", "tau", "validation_score")}), file=sys.stderr)
