"""What only a GPU can check about the compiled decode step, as one JSON report (run before the GPU benchmark).

    PYTHONPATH=src python3 benchmarks/gpu_checks.py [--device cuda] [--json benchmarks/results/gpu-checks-h100.json]

1. noise: routing.gumbel_noise on the CPU, on the device eagerly, and compiled by inductor on the device (Triton
   there): the noise must be bitwise the same everywhere (the uniforms are integer hashes; the Gumbel transform
   runs in float64).
2. step: builtin:s on the device, float32 and bfloat16, K = 8, 3 prompts (rounded up to 4 rows), 16 greedy steps,
   the decode step compiled as `--compile auto` compiles it there (inductor, CUDA graphs on CUDA) against the eager
   step: largest log-prob difference, same greedy tokens, graphs compiled, CUDA-graph skips that inductor reports
   (a skip means the step runs without CUDA graphs), and the operations of one eager step that make the host wait
   for the device (must be none).
3. generate: `RosterOfExperts.generate` with compile auto against off, float32: the same strings.

Needs torch and transformers only. Runs on the CPU too (`--device cpu`: the CUDA-graph column is then empty).
"""

import argparse
import json
import platform
import time

import torch
import transformers

from roe import RoEConfig, RosterOfExperts
from roe.bench import HostWaits
from roe.engine import decode_step, pad_batch
from roe.routing import NOISE_VERSION, gumbel_noise

PROMPTS = ["Question: Tom has 12 apples. He buys 30 more. How many apples does Tom have now?\nAnswer:",
           "x = 3\nprint(x * 4)\n# Output:\n", "Question: Which number is the largest: 3, 41, 17?\nAnswer:"]


def noise_check(device: str) -> dict:
    seeds = torch.tensor([0, 1, 2**62 + 12345, 2**63 - 1])[:, None, None, None]
    positions = torch.tensor([0, 7, 4095, 100_000])[None, :, None, None]
    samples = torch.arange(8)[None, None, :, None]
    layers = torch.tensor([0, 5, 15])[:, None, None, None, None]
    cpu = gumbel_noise(seeds, positions, samples, layers, 64)
    moved = [t.to(device) for t in (seeds, positions, samples, layers)]
    eager = gumbel_noise(*moved, 64).cpu()
    torch._dynamo.reset()
    compiled = torch.compile(gumbel_noise, backend="inductor", fullgraph=True, dynamic=False)(*moved, 64).cpu()
    return {"values": cpu.numel(), "device_eager_bitwise_equal": torch.equal(cpu, eager),
            "device_compiled_bitwise_equal": torch.equal(cpu, compiled),
            "max_abs_diff": max(float((cpu - eager).abs().max()), float((cpu - compiled).abs().max()))}


def _greedy(roster, steps: int, compile) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [roster.tokenizer(p).input_ids for p in PROMPTS]
    batch, mask = pad_batch(ids, max(map(len, ids)), roster.pad_token_id, left=True)
    run = roster.new_pass([0, 1, 2], capacity=batch.shape[1] + steps, compile=compile)
    run.prefill(batch[:, :-1], mask[:, :-1])
    current, logprobs = batch[:, -1:], []
    for _ in range(steps):
        logprobs.append(run.decode(current))
        current = logprobs[-1].argmax(-1, keepdim=True).cpu()
    out = torch.stack(logprobs, 1).float().cpu()  # [B, steps, V]
    return out, out.argmax(-1)


def step_check(device: str, dtype: torch.dtype, steps: int = 16) -> dict:
    roster = RosterOfExperts.from_pretrained("builtin:s", RoEConfig(num_samples=8, tau=0.5, skip_layers=1),
                                             device=device, dtype=dtype, compile="on")
    roster.eos_token_ids = set()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager, eager_tokens = _greedy(roster, steps, compile=None)
    t0 = time.perf_counter()
    compiled, compiled_tokens = _greedy(roster, steps, compile=roster.compile_backend)
    first_s = time.perf_counter() - t0
    again, _ = _greedy(roster, steps, compile=roster.compile_backend)  # a second pass of the same shape

    ids = torch.tensor([roster.tokenizer(PROMPTS[1]).input_ids])
    run = roster.new_pass([0], capacity=ids.shape[1] + 2)
    run.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool))
    step = run._step(run.k, run.next_pos, run.slot, run.valid)
    with HostWaits() as mode:  # the body that torch.compile traces, run eagerly on the device
        run._call(step, decode_step, run, ids[:, -1:].to(run.device), torch.ones(1, dtype=torch.bool, device=run.device))
    return {"dtype": str(dtype).removeprefix("torch."), "steps": steps,
            "max_abs_logprob_diff": float((compiled - eager).abs().max()),
            "same_greedy_tokens": bool(torch.equal(compiled_tokens, eager_tokens)),
            "second_pass_equal": bool(torch.equal(again, compiled)),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]) if device.startswith("cuda") else None,
            "first_compiled_pass_s": round(first_s, 1), "host_waits_in_a_step": mode.waits}


def generate_check(device: str) -> dict:
    roster = RosterOfExperts.from_pretrained("builtin:s", device=device, dtype=torch.float32, compile="on")
    kw = dict(max_new_tokens=32, stop=["\n\n"])
    compiled = roster.generate(PROMPTS, **kw)
    eager = roster.with_config(compile="off").generate(PROMPTS, **kw)
    return {"same_strings": compiled == eager, "compiled": compiled, "eager": eager}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args(argv)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "noise_version": NOISE_VERSION}
    checks = [("noise", lambda: noise_check(args.device)),
              ("step_float32", lambda: step_check(args.device, torch.float32)),
              ("step_bfloat16", lambda: step_check(args.device, torch.bfloat16)),
              ("generate", lambda: generate_check(args.device))]
    for name, check in checks:  # one failing check does not hide the others
        try:
            report[name] = check()
        except Exception as e:  # noqa: BLE001 (reported, not raised: the report is the product)
            report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(name, json.dumps(report[name])[:600], flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
