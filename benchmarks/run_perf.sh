#!/usr/bin/env bash
# Regenerates the CPU performance tables and plot (benchmarks/RESULTS-perf.md, benchmarks/perf.png).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=src
.venv/bin/roe bench --model builtin -k 1,8,32,64 --prompt-tokens 64 --new-tokens 128 --cache clean,full \
    --independent-k 8 --naive-k 8 --naive-tokens 128 --ablations --repeats 3 \
    --experts-impls grouped_mm,roe_dense --json benchmarks/results/perf-cpu-builtin.json
.venv/bin/python benchmarks/dedup_bound.py --json benchmarks/results/dedup-bound-cpu-builtin.json
.venv/bin/python benchmarks/perf_report.py benchmarks/results/perf-*.json
