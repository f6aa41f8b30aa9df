#!/usr/bin/env bash
# The GPU performance run, then its report. A random-weight model with OLMoE-1B-7B's shape (bf16), 64 prompt + 128
# new tokens, tau 0.5 on the middle MoE layers (the first and last kept clean), all in one process so the ratios
# compare rows of one run:
#   base model; transformers' own generate, eager (hf-eager) and with a static cache, which transformers compiles
#   (hf-compiled); RoE K = 1, 8, 32, 64 on the clean cache (the decode step compiled: --compile auto on CUDA);
#   16 prompts batched (base, hf-eager, hf-compiled, RoE K = 8); compile time per shape; average power and energy
#   per token through NVML when pynvml (nvidia-ml-py) can be imported, "not measured" in the power columns otherwise.
# Needs torch and transformers only (no rich, matplotlib, fastapi, ...). nvidia-ml-py is pure Python: a wheel of it
# in .whl/ (e.g. from `pip download nvidia-ml-py -d .whl --no-deps`) is imported from the zip, nothing installed.
# Writes benchmarks/results/perf-gpu-<name>-random-olmoe-1b-7b.json (rewritten after every measurement: a run cut
# short keeps what it measured, marked "complete": false) and the .md report next to it, then regenerates
# benchmarks/RESULTS-perf.md from every perf-*.json.
# Usage on a CUDA machine: bash benchmarks/run_perf_gpu.sh [name]   (name: e.g. h100; default: the GPU's name)
# Before it, in a call of its own (the device machine allows 10 minutes a command), the correctness checks only a
# GPU can make: PYTHONPATH=src python3 benchmarks/gpu_checks.py --json benchmarks/results/gpu-checks-<name>.json
# Environment: PY (the python), REPEATS (default 3), KS (default 1,8,32,64); EXTENDED=1 afterwards also runs the
# older, longer set (full cache, engine ablations, K independent passes, no cache) into ...-extended.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
nvml=$(ls .whl/nvidia_ml_py-*.whl 2>/dev/null | head -n 1 || true)
export PYTHONPATH="src${nvml:+:$nvml}${PYTHONPATH:+:$PYTHONPATH}"
name=${1:-$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")}
out="benchmarks/results/perf-gpu-$name-random-olmoe-1b-7b"
$PY -c "import pynvml" 2>/dev/null && echo "NVML: pynvml importable" || echo "NVML: pynvml not importable: no power columns"
$PY -m roe.cli bench --model random-olmoe-1b-7b --device cuda --tau 0.5 --compile auto -k "${KS:-1,8,32,64}" \
    --prompt-tokens 64 --new-tokens 128 --cache clean --independent-k "" --naive-k "" \
    --batch-sizes 1,16 --batch-k 8 --repeats "${REPEATS:-3}" --json "$out.json"
$PY benchmarks/perf_report.py --md "$out.md" "$out.json" > /dev/null
echo "wrote $out.json and $out.md"
if [ "${EXTENDED:-0}" = 1 ]; then
    $PY -m roe.cli bench --model random-olmoe-1b-7b --device cuda --tau 0.5 --compile auto -k "${KS:-1,8,32,64}" \
        --prompt-tokens 64 --new-tokens 128 --cache clean,full --independent-k 8 --naive-k 8 --naive-tokens 16 \
        --ablations --batch-sizes 1 --no-hf --repeats "${REPEATS:-3}" --json "$out-extended.json"
    $PY benchmarks/perf_report.py --md "$out-extended.md" "$out-extended.json" > /dev/null
fi
$PY benchmarks/perf_report.py benchmarks/results/perf-*.json > /dev/null
echo "regenerated benchmarks/RESULTS-perf.md"
