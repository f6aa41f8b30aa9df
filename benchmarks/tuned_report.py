"""Markdown for claim 1 with per-task tuned profiles (benchmarks/RESULTS-tuned.md) from tuned_per_task.sh's JSON."""

import json
from pathlib import Path

R = Path(__file__).parent / "results"
md = ["# Claim 1, per-task tuning\n",
      "Per category: `roe tune` (Optuna TPE, 20 trials, K = 8, tau in [0, 0.5] on the middle MoE layers, 50 validation "
      "examples; objective as in the paper: perplexity for math, accuracy for choice and code), then `roe eval` on the "
      "first 200 test items with 5 seeds. Command: `bash benchmarks/tuned_per_task.sh`.\n",
      "| task | objective | tuned tau | validation: base -> tuned | test base (K = 1) | test RoE (K = 8), mean ± std | difference | beyond 2 std |",
      "|---|---|---|---|---|---|---|---|"]
for task in ("math", "choice", "code"):
    prof = json.loads((R / f"tuned_{task}.json").read_text())
    ev = {r["k"]: r for r in json.loads((R / f"eval_tuned_{task}.json").read_text())["summary"]}
    base, roe = ev[1], ev[8]
    diff = roe["mean"] - base["mean"]
    tau = ", ".join(f"{t:.2f}" for t in prof["tau"])
    md.append(f"| {task} | {prof['objective']} | [{tau}] | {prof['validation_score_base']:.4f} -> {prof['validation_score']:.4f} | "
              f"{base['mean']:.3f} | {roe['mean']:.3f} ± {roe['std']:.3f} | {diff:+.3f} | "
              f"{'yes' if roe['std'] and abs(diff) > 2 * roe['std'] else 'no' if roe['std'] else ('n/a' if diff == 0 else 'yes (std 0)')} |")
(Path(__file__).parent / "RESULTS-tuned.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
