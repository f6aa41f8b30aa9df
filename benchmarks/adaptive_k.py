"""Adaptive K against fixed K on a built-in checkpoint: quality, the tokens that run noisy samples, the experts a
decode step visits, and speed.

    PYTHONPATH=src .venv/bin/python benchmarks/adaptive_k.py [--model builtin:s] [--texts 40] [--tau T]

Quality (perplexity of `--texts` built-in test texts, teacher-forced). Under the clean cache adaptive K's
distribution at a position is exactly fixed K's where the rule runs the noisy samples and the clean one where it
skips (tests/test_adaptive.py checks this against the engine), so one clean and one fixed-K pass per text give
the perplexity at every threshold; the engine's own adaptive scoring (`roster.perplexity`) is run for one
threshold per metric and must agree. Two rules side by side:
- "previous" (what the engine does): the clean prediction the input token was drawn from (position t-1);
- "current" (not implementable in one pass, for reference only): the clean prediction being made (position t),
  which needs the clean row's output before routing the noisy rows.
Decode (greedy, B = 1, `--prompts` prompts, expert recording): the fraction of decoded tokens with noisy samples
and the distinct experts the K rows of a prompt visit per MoE layer per step (what grouped_mm reads; the engine's
dense CPU dispatch for small float32 experts reads every expert whatever the rows choose).
Speed: tokens/s, interleaved rounds over the configurations, best round kept (the CPU is shared), for the engine's
default dispatch and for transformers' grouped_mm.
Writes benchmarks/results/adaptive-k-<model>[-tauT].json and prints Markdown tables.
"""

import argparse
import json
import math
import platform
from pathlib import Path

import torch

from roe import RoEConfig, RosterOfExperts
from roe.bench import measure
from roe.builtin import resolve_model
from roe.engine import aggregate, uncertain
from roe.evaluate import load_items

HERE = Path(__file__).parent
THRESHOLDS = {"entropy": (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), "margin": (0.2, 0.5, 0.8, 0.9, 0.95, 0.99)}
ENGINE_CHECK = {"entropy": 0.2, "margin": 0.9}  # one threshold per metric scored by the engine itself
DECODE = [(None, None), ("entropy", 0.05), ("entropy", 0.5), ("margin", 0.9), ("margin", 0.5)]


def per_position(base, fixed, texts):
    """Per scored position of every text: clean logits' rule inputs and the target log-probs, clean and fixed K."""
    rows = []
    for t in texts:
        ids = torch.tensor([base.encode_prompt(t)])
        inputs, targets = ids[:, :-1], ids[0, 1:]
        out = {}
        for name, r in (("clean", base), ("fixed", fixed)):
            run = r.new_pass([r.config.seed], capacity=ids.shape[1], compile=None)
            logp = aggregate(run.forward(inputs), r.config.aggregate)[0]  # [S, V]
            out[name] = logp.gather(-1, targets[:, None])[:, 0]
            if name == "clean":
                out["logits"] = logp
        rows.append(out)
    return rows


def compose(rows, metric, threshold, rule):
    """(perplexity, noisy fraction) of adaptive K from the per-position results."""
    total = count = noisy = 0
    for r in rows:
        wants = uncertain(r["logits"], metric, threshold)  # [S] the rule applied to each clean prediction
        gate = torch.cat([torch.ones(1, dtype=torch.bool), wants[:-1]]) if rule == "previous" else wants
        lp = torch.where(gate, r["fixed"], r["clean"])
        total, count, noisy = total + float(lp.sum()), count + lp.numel(), noisy + int(gate.sum())
    return math.exp(-total / count), noisy / count


def decode_experts(roster, prompts, new_tokens):
    """Greedy decode with expert recording: (noisy fraction, distinct experts per MoE layer per step)."""
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


def speed(configs, prompt, new_tokens, rounds):
    """Best tokens/s over interleaved rounds, per (configuration, dispatch)."""
    best = {}
    for _ in range(rounds):
        for name, r in configs:
            for engine in ("optimised", "transformers' expert dispatch"):
                row = measure(r, "roe", r.config.num_samples, "clean", prompt, new_tokens, engine=engine,
                              compile="off")
                best[name, engine] = max(best.get((name, engine), 0.0), row.tokens_per_s)
    return best


def label(metric, threshold, k):
    if k == 1:
        return "base (K = 1)"
    return "fixed K" if metric is None else f"{metric} {threshold:g}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:s")
    p.add_argument("--texts", type=int, default=40)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tau", type=float, help="one tau for the middle MoE layers instead of the profile's")
    args = p.parse_args()
    path, profile = resolve_model(args.model)
    fixed = RosterOfExperts.from_pretrained(path, roe=profile or RoEConfig(num_samples=8, tau=0.2))
    fixed.eos_token_ids = set()  # decode the full length
    if args.tau is not None:
        fixed = fixed.with_config(tau=args.tau, skip_layers=1)
    base = fixed.with_config(num_samples=1)
    texts = [ex["text"] for ex in load_items("ppl", "test", args.texts)]
    rows = per_position(base, fixed, texts)
    count = sum(r["clean"].numel() for r in rows)
    quality = {name: math.exp(-sum(float(r[name].sum()) for r in rows) / count) for name in ("clean", "fixed")}
    quality["base"] = quality.pop("clean")
    curves = []
    for metric, thresholds in THRESHOLDS.items():
        for t in thresholds:
            for rule in ("previous", "current"):
                ppl, frac = compose(rows, metric, t, rule)
                curves.append(dict(metric=metric, threshold=t, rule=rule, ppl=ppl, noisy=frac))
    checks = []
    for metric, t in ENGINE_CHECK.items():  # the engine's own adaptive scoring, against the composition
        engine = fixed.with_config(adaptive_metric=metric, adaptive_threshold=t).perplexity(texts)
        checks.append(dict(metric=metric, threshold=t, engine_ppl=engine,
                           composed_ppl=compose(rows, metric, t, "previous")[0]))
    prompts = [torch.tensor([fixed.encode_prompt(t)[: args.prompt_tokens]]) for t in texts[: args.prompts]]
    configs = [("base (K = 1)", base)] + [
        (label(m, t, 8), fixed if m is None else fixed.with_config(adaptive_metric=m, adaptive_threshold=t))
        for m, t in DECODE]
    decoded = {name: decode_experts(r, prompts, args.new_tokens) for name, r in configs}
    fast = speed(configs, prompts[0], args.new_tokens, args.rounds)
    doc = dict(model=args.model, tau=list(fixed.config.tau) if isinstance(fixed.config.tau, tuple) else fixed.config.tau,
               k=fixed.config.num_samples, texts=args.texts, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
               new_tokens=args.new_tokens, rounds=args.rounds, threads=torch.get_num_threads(),
               torch=torch.__version__, python=platform.python_version(), quality=quality, curves=curves,
               engine_checks=checks,
               decode=[dict(config=n, noisy=decoded[n][0], experts_per_layer_step=decoded[n][1],
                            tokens_per_s=fast[n, "optimised"],
                            tokens_per_s_grouped_mm=fast[n, "transformers' expert dispatch"]) for n, _ in configs])
    name = args.model.replace(":", "-") + ("" if args.tau is None else f"-tau{args.tau:g}")
    out = HERE / "results" / f"adaptive-k-{name}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    report(doc)
    print(f"wrote {out}")


def report(doc):
    q = doc["quality"]
    print(f"perplexity: base {q['base']:.4f}, fixed K = {doc['k']} {q['fixed']:.4f}")
    print("\n| rule | threshold | noisy tokens (previous / current) | ppl (previous / current) | share of fixed K's gain (previous) |")
    print("|---|---|---|---|---|")
    by = {(c["metric"], c["threshold"], c["rule"]): c for c in doc["curves"]}
    for metric, thresholds in THRESHOLDS.items():
        for t in thresholds:
            a, b = by[metric, t, "previous"], by[metric, t, "current"]
            gain = (q["base"] - a["ppl"]) / (q["base"] - q["fixed"]) if q["base"] != q["fixed"] else float("nan")
            print(f"| {metric} | {t:g} | {a['noisy']:.2f} / {b['noisy']:.2f} | {a['ppl']:.4f} / {b['ppl']:.4f} | "
                  f"{gain:.0%} |")
    for c in doc["engine_checks"]:
        print(f"engine check {c['metric']} {c['threshold']:g}: engine ppl {c['engine_ppl']:.6f}, "
              f"composed {c['composed_ppl']:.6f}")
    print("\n| decode config | noisy tokens | experts/layer/step | tok/s (default dispatch) | tok/s (grouped_mm) |")
    print("|---|---|---|---|---|")
    for d in doc["decode"]:
        print(f"| {d['config']} | {d['noisy']:.2f} | {d['experts_per_layer_step']:.2f} | {d['tokens_per_s']:.1f} | "
              f"{d['tokens_per_s_grouped_mm']:.1f} |")


if __name__ == "__main__":
    main()
