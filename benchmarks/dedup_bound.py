"""How much could expert de-duplication save? An upper bound, measured before building it.

    python benchmarks/dedup_bound.py [--model builtin] [-k 8,32] [--repeats 5]

At the first noisy MoE layer the K rows of a prompt enter with the same hidden state,
so a (row, expert) pair repeated across samples could be computed once. The most this
can save is the whole expert computation of that layer on K-1 of every K rows. This
script times the RoE decode step (clean cache, tau 0.5, skip_layers 1) normally, and
with that layer's experts run on one row per prompt and copied K times: a step that
does *less* work than any correct de-duplication could (the results are wrong on
purpose and thrown away). The gap between the two is the ceiling on the gain.
"""

import argparse
import json
import statistics

import torch

from roe import RoEConfig, RosterOfExperts
from roe.adapters import find_experts, find_moe_layers
from roe.bench import run_roe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("-k", default="8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args(argv)
    roster = RosterOfExperts.from_pretrained(args.model, roe=RoEConfig(tau=0.5, skip_layers=1))
    model = roster.model
    layer, experts = next((i, e) for (i, _), e, tau in zip(find_moe_layers(model), find_experts(model), roster.taus)
                          if tau > 0)
    prompt = torch.randint(4, 700, (1, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for k in [int(x) for x in args.k.split(",")]:
        r = roster.with_config(num_samples=k)
        original = experts.forward

        def one_row_per_prompt(hidden, idx, weights, k=k):  # decode, [K, D] -> the first row, copied K times
            if hidden.shape[0] != k:  # the prompt's prefill: one clean row per position
                return original(hidden, idx, weights)
            return original(hidden[:1], idx[:1], weights[:1]).expand(k, -1)

        times = {"normal": [], "bound": []}
        run_roe(r, prompt, 16)
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for name in times:
                if name == "bound":
                    experts.forward = one_row_per_prompt
                try:
                    times[name].append(1000 * run_roe(r, prompt, args.new_tokens)[0].decode_s / args.new_tokens)
                finally:
                    experts.forward = original
        normal, bound = statistics.median(times["normal"]), statistics.median(times["bound"])
        rows.append(dict(k=k, layer=layer, ms_per_token=normal, ms_per_token_bound=bound, max_saving=1 - bound / normal))
        print(f"K={k}: {normal:.2f} ms/token; with layer {layer}'s experts on one row per prompt {bound:.2f} ms/token: "
              f"de-duplication could save at most {100 * (1 - bound / normal):.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
