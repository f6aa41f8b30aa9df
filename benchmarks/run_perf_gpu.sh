#!/usr/bin/env bash
# The GPU performance run (a random-weight model with OLMoE-1B-7B's shape, bf16), then the report.
# Usage on a CUDA machine: bash benchmarks/run_perf_gpu.sh [name]   (name: e.g. h100; default: the GPU's name)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=src
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
name=${1:-$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")}
$PY -m roe.cli bench --model random-olmoe-1b-7b --device cuda -k 1,8,32,64 --prompt-tokens 64 --new-tokens 128 \
    --cache clean,full --independent-k 8 --naive-k 8 --naive-tokens 16 --ablations --repeats 3 \
    --json "benchmarks/results/perf-gpu-$name-random-olmoe-1b-7b.json"
$PY benchmarks/perf_report.py benchmarks/results/perf-*.json
