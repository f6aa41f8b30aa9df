"""Adaptive K against fixed K on a built-in checkpoint: quality, speed, and the experts a decode step reads.

    PYTHONPATH=src .venv/bin/python benchmarks/adaptive_k.py [--model builtin:s] [--texts 40] [--prompts 4] [--tau T]

Rows: the base model (K = 1), fixed K (the checkpoint's profile, K = 8), and adaptive K at a few thresholds of
each metric. Columns:
- noisy: the fraction of tokens whose noisy samples took effect, over the decoded tokens and the scored ones
- ppl: perplexity of `--texts` built-in test texts (teacher-forced; RoE scoring applies the same rule)
- tok/s: greedy decode speed, B = 1, the engine's default expert dispatch, and transformers' grouped_mm
- experts/layer/step: the distinct experts the K rows of a prompt visit per MoE layer per decode step (what
  grouped_mm reads; the dense CPU dispatch reads every expert whatever the rows choose)
Writes benchmarks/results/adaptive-k-<model>.json and prints a Markdown table.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import roe.engine
from roe import RoEConfig, RosterOfExperts
from roe.bench import ABLATIONS, measure
from roe.builtin import resolve_model
from roe.evaluate import load_items

HERE = Path(__file__).parent
SETTINGS = [(None, None)] + [("entropy", t) for t in (0.05, 0.2, 0.5, 1.0)] + [("margin", t) for t in (0.5, 0.9, 0.99)]


def count_gates(fn):
    """Run fn() and count the gates RoEPass.combine applies (scored positions with noisy samples / all)."""
    seen = [0, 0]
    original = roe.engine.RoEPass.combine

    def combine(self, logits):
        if self.last_gate is not None:
            gate = self.last_gate[: logits.shape[0]]
            seen[0] += int(gate.sum())
            seen[1] += gate.numel()
        return original(self, logits)
    roe.engine.RoEPass.combine = combine
    try:
        return fn(), seen
    finally:
        roe.engine.RoEPass.combine = original


def perplexity(roster, texts):
    """Perplexity, and the noisy fraction over the scored positions (one text per batch: no padding counted)."""
    if roster.config.adaptive_metric is None:
        return roster.perplexity(texts), 1.0 if roster.config.num_samples > 1 else 0.0
    total, count, seen = 0.0, 0, [0, 0]
    for t in texts:
        ids = roster.encode_prompt(t)
        (lp,), s = count_gates(lambda: roster.token_logprobs([(ids[:1], ids[1:])]))
        total, count = total + float(lp.sum()), count + lp.numel()
        seen = [seen[0] + s[0], seen[1] + s[1]]
    return float(torch.tensor(-total / count).exp()), seen[0] / seen[1]


def decode_experts(roster, prompts, new_tokens):
    """Greedy decode with expert recording: (noisy fraction, distinct experts per MoE layer per step, per row)."""
    noisy = steps = 0
    distinct = []
    for p in prompts:
        run = roster.new_pass([roster.config.seed], record_experts=True, capacity=p.shape[1] + new_tokens + 1)
        run.prefill(p[:, :-1], torch.ones_like(p[:, :-1], dtype=torch.bool))
        current = p[:, -1:]
        for _ in range(new_tokens):
            noisy += int(run.gate[0]) if roster.config.num_samples > 1 else 0  # the gate this step runs under
            steps += 1
            current = run.decode(current).argmax(-1, keepdim=True)
        for layers in run.chosen[1:]:  # the decode steps (the first forward is the prefill)
            distinct.append(sum(len(set(idx.flatten().tolist())) for idx in layers) / len(layers))
    return noisy / steps, sum(distinct) / len(distinct)


def speed(roster, prompt, new_tokens, repeats):
    """Best-of-`repeats` tokens/s: the engine's dispatch, then transformers' grouped_mm (its dispatch kept)."""
    k, out = roster.config.num_samples, []
    for engine in ("optimised", "transformers' expert dispatch"):
        rows = [measure(roster, "roe", k, "clean", prompt, new_tokens, engine=engine, compile="off")
                for _ in range(repeats)]
        out.append(max(r.tokens_per_s for r in rows))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:s")
    p.add_argument("--texts", type=int, default=40)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tau", type=float, help="one tau for the middle MoE layers instead of the profile's")
    args = p.parse_args()
    path, profile = resolve_model(args.model)
    base = RosterOfExperts.from_pretrained(path, roe=profile or RoEConfig(num_samples=8, tau=0.2))
    base.eos_token_ids = set()  # decode the full length
    if args.tau is not None:
        base = base.with_config(tau=args.tau, skip_layers=1)
    texts = [ex["text"] for ex in load_items("ppl", "test", args.texts)]
    prompts = [torch.tensor([base.encode_prompt(t)[: args.prompt_tokens]]) for t in texts[: args.prompts]]
    rows = []
    settings = [("base", None)] + SETTINGS
    for metric, threshold in settings:
        if metric == "base":
            r = base.with_config(num_samples=1)
        else:
            r = base.with_config(adaptive_metric=metric, adaptive_threshold=threshold)
        start = time.perf_counter()
        ppl, scored_noisy = perplexity(r, texts)
        decoded_noisy, experts = decode_experts(r, prompts, args.new_tokens)
        fast, grouped = speed(r, prompts[0], args.new_tokens, args.repeats)
        rows.append(dict(metric=metric, threshold=threshold, k=r.config.num_samples, ppl=ppl,
                         noisy_scored=scored_noisy, noisy_decoded=decoded_noisy, experts_per_layer_step=experts,
                         tokens_per_s=fast, tokens_per_s_grouped_mm=grouped, seconds=time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
    doc = dict(model=args.model, tau=list(base.config.tau) if isinstance(base.config.tau, tuple) else base.config.tau,
               texts=args.texts, prompts=args.prompts, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
               threads=torch.get_num_threads(), device="cpu", torch=torch.__version__,
               python=platform.python_version(), rows=rows, note=f"engine ablations: {sorted(ABLATIONS)}")
    name = args.model.replace(":", "-") + ("" if args.tau is None else f"-tau{args.tau:g}")
    out = HERE / "results" / f"adaptive-k-{name}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("| rule | K | noisy tokens (decoded / scored) | ppl | tok/s (default / grouped_mm) | experts/layer/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rule = "base (K = 1)" if r["metric"] == "base" else (
            "fixed K" if r["metric"] is None else f"{r['metric']} {r['threshold']:g}")
        print(f"| {rule} | {r['k']} | {r['noisy_decoded']:.2f} / {r['noisy_scored']:.2f} | {r['ppl']:.4f} | "
              f"{r['tokens_per_s']:.1f} / {r['tokens_per_s_grouped_mm']:.1f} | {r['experts_per_layer_step']:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
