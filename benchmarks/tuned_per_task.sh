#!/usr/bin/env bash
# Claim 1 with the paper's protocol: tau tuned per task category on validation (Optuna TPE), measured on test
# with 5 seeds against the base model. Writes benchmarks/results/tuned_{task}.json/.png and eval_{task}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=src
R=benchmarks/results
for spec in "math ppl" "choice accuracy" "code accuracy"; do
    set -- $spec
    .venv/bin/roe tune --model builtin --task $1 --objective $2 -k 8 --trials 20 --max-tau 0.5 --skip-layers 1 \
        --val-examples 50 --seed 0 -o $R/tuned_$1.json
    .venv/bin/roe eval --model builtin --task $1 -k 1,8 --seeds 5 --limit 200 --profile $R/tuned_$1.json \
        --json $R/eval_tuned_$1.json
done
.venv/bin/python benchmarks/tuned_report.py
