#!/usr/bin/env bash
# Regenerates the CPU performance tables and plot (benchmarks/RESULTS-perf.md, benchmarks/perf.png): RoE against the
# base model and transformers' own generate (hf-eager, hf-compiled: on the CPU transformers does not compile, the
# static cache runs eagerly), 16 prompts batched, the engine's before/after rows and the expert dispatch; then the
# compiled decode step's rows.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=src
.venv/bin/python -m roe.cli bench --model builtin -k 1,8,32,64 --prompt-tokens 64 --new-tokens 128 --cache clean,full \
    --independent-k 8 --naive-k 8 --naive-tokens 128 --ablations --repeats 3 --batch-sizes 1,16 --batch-k 8 \
    --experts-impls grouped_mm,roe_dense --json benchmarks/results/perf-cpu-builtin.json
# the same model with the decode step compiled (inductor on the CPU; `auto` compiles only on CUDA): 23-56 s per shape
.venv/bin/python -m roe.cli bench --model builtin --tau 0.5 --compile on -k 1,8,32 --prompt-tokens 64 --new-tokens 128 \
    --cache clean --independent-k "" --naive-k "" --batch-sizes 1,16 --batch-k 8 --repeats 3 \
    --json benchmarks/results/perf-cpu-builtin-compiled.json
.venv/bin/python benchmarks/dedup_bound.py --json benchmarks/results/dedup-bound-cpu-builtin.json
.venv/bin/python benchmarks/perf_report.py benchmarks/results/perf-*.json
