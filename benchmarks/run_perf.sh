#!/usr/bin/env bash
# Regenerates the CPU performance table and plot (benchmarks/RESULTS-perf-tables.md, benchmarks/perf.png).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=src
.venv/bin/roe bench --model builtin -k 1,8,32,64 --prompt-tokens 64 --new-tokens 128 --cache clean,full \
    --independent-k 8 --naive-k 8 --naive-tokens 16 --experts-impls eager,batched_mm,grouped_mm --json benchmarks/results/perf-cpu-builtin.json
.venv/bin/python benchmarks/perf_report.py benchmarks/results/perf-*.json
