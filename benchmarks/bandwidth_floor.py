"""How far each row of a `roe bench` GPU run is from the memory-bandwidth limit of a decode step.

A decode step must read, at the least, every weight outside the routed experts and, in each MoE
layer, every expert some row chose (`roe.bench.weight_bytes_per_token`). At the device's peak
bandwidth that is a latency floor; RoE's K rows choose more distinct experts than one row, so its
floor is higher than the base model's. Rows of older runs that lack the field get it from their
measured distinct experts per layer (the random OLMoE-1B-7B shape: every MoE layer alike).
`--kernels` also counts the operations one decode step dispatches for that shape (narrow layers on the
CPU, transformers' grouped_mm expert dispatch as on a GPU): the launch-bound side of the same question.

    python benchmarks/bandwidth_floor.py benchmarks/results/perf-gpu-h100-random-olmoe-1b-7b.json --kernels
"""

import argparse
import json

import torch

from roe import RoEConfig, RosterOfExperts, bench


def kernel_counts():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    shape, tokenizer = bench.random_olmoe_1b_7b("meta")
    narrow = shape.config.to_dict() | dict(hidden_size=64, intermediate_size=32, vocab_size=764)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**narrow)).eval()
    roster = RosterOfExperts(model, tokenizer, RoEConfig(tau=0.5, skip_layers=1))
    prompt = torch.randint(4, 764, (1, 64), generator=torch.Generator().manual_seed(0))
    base = bench.kernels_per_token(roster, prompt, "base")
    print(f"kernels per decode step, {model.config.num_hidden_layers} layers x {model.config.num_experts} experts: base {base}")
    for cache in ("clean", "full"):
        for k in (8, 32):
            n = bench.kernels_per_token(roster.with_config(num_samples=k, cache=cache), prompt, "roe",
                                        choose_dispatch=False)
            print(f"RoE K = {k} {cache}: {n} ({100 * (n / base - 1):+.0f}%)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--tb-per-s", type=float, default=3.35, help="peak memory bandwidth (H100 SXM: 3.35)")
    p.add_argument("--kernels", action="store_true", help="also count kernels per decode step for the OLMoE shape")
    args = p.parse_args()
    if args.kernels:
        kernel_counts()
    rows = json.load(open(args.json))["rows"]
    model = None
    print("| method | K | cache | distinct experts/layer | weights read GB | x base | floor ms | measured ms | x floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_bytes = base_distinct = None
    for r in rows:  # single-prompt rows (a batched row's step serves several tokens)
        if r["method"] not in ("base", "roe", "hf-eager", "hf-compiled") or r.get("batch", 1) != 1 \
                or r.get("engine", "optimised") != "optimised":
            continue
        read, distinct = r.get("weight_bytes_per_token"), r["distinct_experts_per_layer"]
        if r["method"].startswith("hf-"):  # transformers' generate: the base model's weights, one row
            read, distinct = base_bytes, base_distinct
            if read is None:
                continue
        elif read is None:
            if model is None:
                model, _ = bench.random_olmoe_1b_7b("meta")  # shapes only, no memory
            distinct = distinct or model.config.num_experts_per_tok  # one row: its top-k
            read = bench.weight_bytes_per_token(model, [distinct] * model.config.num_hidden_layers)
        if base_bytes is None and r["method"] == "base":
            base_bytes, base_distinct = read, distinct
        floor_ms = read / (args.tb_per_s * 1e12) * 1e3
        print(f"| {r['method']} | {r['k']} | {r['cache'] or '-'} | {distinct:.1f} | "
              f"{read / 1e9:.2f} | {read / base_bytes:.2f} | {floor_ms:.2f} | {r['ms_per_token']:.2f} | "
              f"{r['ms_per_token'] / floor_ms:.0f} |")


if __name__ == "__main__":
    main()
