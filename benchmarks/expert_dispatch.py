"""Expert dispatch per layer shape: where does running every expert densely beat transformers' kernels?

    python benchmarks/expert_dispatch.py [--rows 1,8,32,64] [--json benchmarks/results/expert-dispatch-cpu.json]

Times one MoE layer's experts (float32, CPU) for the built-in models' layer shapes and
OLMoE-1B-7B's (random weights), at the row counts of a RoE decode step (K rows per
prompt), with transformers' grouped_mm and batched_mm and roe's dense dispatch, and
prints which rule `roe.experts.prefers_dense` applies. The rule's thresholds in
src/roe/experts.py come from this table.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import OlmoeConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from roe import RosterOfExperts
from roe.experts import DENSE, prefers_dense

IMPLS = ("grouped_mm", "batched_mm", DENSE)


def layer_shapes():
    for size in ("s", "m", "l"):
        model = RosterOfExperts.from_pretrained(f"builtin:{size}").unwrap()
        yield f"builtin:{size}", model.model.layers[1].mlp.experts, model.config.num_experts_per_tok
    cfg = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8)
    yield "olmoe-1b-7b shape", OlmoeExperts(cfg).eval(), 8


def time_call(fn, repeats=7, inner=20):
    fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t) / inner * 1e6)
    return statistics.median(runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32,64")
    p.add_argument("--json")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'layer':18s} {'rows':>5s} " + " ".join(f"{i:>12s}" for i in IMPLS) + "   rule")
    with torch.inference_mode():
        for name, experts, top_k in layer_shapes():
            E, D = experts.num_experts, experts.gate_up_proj.shape[-1]
            for n in [int(x) for x in args.rows.split(",")]:
                hidden = torch.randn(n, D, generator=g)
                weights, index = torch.softmax(torch.randn(n, E, generator=g), -1).topk(top_k, -1)
                small = E * D < 10**5
                us = {impl: time_call(lambda impl=impl: ALL_EXPERTS_FUNCTIONS[impl](experts, hidden, index, weights),
                                      inner=20 if small else 2, repeats=7 if small else 3)
                      for impl in IMPLS if small or impl != "batched_mm"}  # batched_mm: minutes on a large layer
                us.setdefault("batched_mm", float("nan"))
                rule = DENSE if prefers_dense(experts, n) else "grouped_mm"
                rows.append(dict(layer=name, rows=n, experts=E, hidden=D, us=us, fastest=min(us, key=us.get), rule=rule))
                print(f"{name:18s} {n:5d} " + " ".join(f"{us[i]:10.0f}us" for i in IMPLS) + f"   {rule}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
