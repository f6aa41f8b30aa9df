"""Regenerates benchmarks/RESULTS-builtin.md and benchmarks/RESULTS-quality.md (+ PNGs) on the built-in family.

    .venv/bin/python benchmarks/quality.py [--limit 200] [--seeds 5]

1. the family: size, training, test accuracy per category, test perplexity
2. base against RoE (the shipped profile, tuned on validation) on test, over seeds
3. accuracy and perplexity against a uniform tau swept from 0 to 1 in steps of 0.05
4. equivalent model size: a power law loss(N) fitted to the family's test loss, RoE at each K placed on it,
   and RoE's cost (per-token latency, peak memory) against the larger models'
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from roe import RoEConfig, RosterOfExperts, builtin_path  # noqa: E402
from roe.bench import measure  # noqa: E402
from roe.evaluate import EVALUATORS, load_items  # noqa: E402

HERE = Path(__file__).parent
TASKS = ("math", "choice", "code")


def fmt(mean, std=None):
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sweep-limit", type=int, default=100)
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from results/quality.json")
    args = p.parse_args()
    if args.report_only:
        write_reports(json.loads((HERE / "results" / "quality.json").read_text()))
        return
    torch.manual_seed(0)
    started = time.time()
    items = {t: load_items(t, "test", args.limit) for t in TASKS}
    ppl_items = load_items("ppl", "test", args.limit)
    out = {"args": vars(args)}

    # 1. the family
    family = []
    rosters = {}
    for size in ("s", "m", "l"):
        r = RosterOfExperts.from_pretrained(f"builtin:{size}", roe=RoEConfig(num_samples=1, tau=0.0))
        rosters[size] = r
        log = json.loads((builtin_path(size) / "training_log.json").read_text())
        row = {"size": size, "parameters": log["parameters"], "train_seconds": log["train_seconds"],
               "device": log["device"], "tokens": log["tokens"], "final_train_loss": log["final_train_loss"],
               "validation_loss": log["validation_loss"]}
        for t in TASKS:
            row[t] = EVALUATORS[t](r, items[t]).value
        row["ppl"] = EVALUATORS["ppl"](r, ppl_items).value
        family.append(row)
        print(row, flush=True)
    out["family"] = family

    # 2. base against RoE (shipped profile) on the default model, over seeds
    roe = RosterOfExperts.from_pretrained("builtin")
    base_row = family[0]
    compare = {}
    for t in (*TASKS, "ppl"):
        values = []
        for seed in range(args.seeds):
            values.append(EVALUATORS[t](roe.with_config(seed=seed), items[t] if t != "ppl" else ppl_items).value)
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        diff = mean - base_row[t]
        compare[t] = {"base": base_row[t], "roe_values": values, "roe_mean": mean, "roe_std": std, "diff": diff,
                      "beyond_seed_noise": abs(diff) > 2 * std if std > 0 else diff != 0}
        print(t, compare[t], flush=True)
    out["roe_vs_base"] = compare
    out["profile"] = roe.config.to_dict()

    # 3. uniform tau sweep
    taus = [round(0.05 * i, 2) for i in range(21)]
    sweep_items = items["math"][: args.sweep_limit]
    sweep_ppl = ppl_items[: args.sweep_limit]
    k = roe.config.num_samples
    sweep = []
    for tau in taus:
        r = roe.with_config(tau=tau, skip_layers=1, seed=0)
        sweep.append({"tau": tau, "math": EVALUATORS["math"](r, sweep_items).value,
                      "choice": EVALUATORS["choice"](r, items["choice"][: args.sweep_limit]).value,
                      "ppl": EVALUATORS["ppl"](r, sweep_ppl).value})
        print(sweep[-1], flush=True)
    out["sweep"] = sweep
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(taus, [s["math"] for s in sweep], "-o", ms=3, label="math")
    a.plot(taus, [s["choice"] for s in sweep], "-s", ms=3, label="choice")
    a.set_xlabel("uniform tau (middle MoE layers)")
    a.set_ylabel("test accuracy")
    a.legend()
    b.plot(taus, [s["ppl"] for s in sweep], "-o", ms=3)
    b.set_xlabel("uniform tau (middle MoE layers)")
    b.set_ylabel("test perplexity")
    fig.suptitle(f"builtin:s, K = {k}, seed 0")
    fig.tight_layout()
    fig.savefig(HERE / "quality_tau_sweep.png", dpi=100)

    # 4. equivalent model size: loss(N) = a * N^-b fitted on the family's test loss (log perplexity)
    ns = [f["parameters"] for f in family]
    losses = [math.log(f["ppl"]) for f in family]
    x = [math.log(n) for n in ns]
    y = [math.log(v) for v in losses]
    xm, ym = statistics.fmean(x), statistics.fmean(y)
    slope = sum((xi - xm) * (yi - ym) for xi, yi in zip(x, y)) / sum((xi - xm) ** 2 for xi in x)
    alpha, log_a = -slope, ym - slope * xm
    equivalent = []
    prompt = torch.randint(4, 700, (1, 64), generator=torch.Generator().manual_seed(0))
    for kk in (1, 2, 4, 8, 16, 32):
        r = roe.with_config(num_samples=kk, seed=0)
        loss = math.log(EVALUATORS["ppl"](r, ppl_items).value)
        n_eq = math.exp((log_a - math.log(loss)) / alpha) if alpha > 0 else float("nan")
        measure(r, "roe", kk, "clean", prompt, 4)
        cost = measure(r, "roe", kk, "clean", prompt, 64)
        equivalent.append({"k": kk, "loss": loss, "equivalent_parameters": n_eq, "ms_per_token": cost.ms_per_token,
                           "peak_mem_bytes": cost.peak_mem_bytes})
        print(equivalent[-1], flush=True)
    larger = []
    for size in ("s", "m", "l"):
        measure(rosters[size], "base", 1, None, prompt, 4)
        c = measure(rosters[size], "base", 1, None, prompt, 64)
        larger.append({"size": size, "parameters": ns["sml".index(size)], "ms_per_token": c.ms_per_token,
                       "peak_mem_bytes": c.peak_mem_bytes})
    out["scaling"] = {"alpha": alpha, "a": math.exp(log_a), "roe": equivalent, "base_models": larger}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    grid = [ns[0] * 0.8 * (ns[-1] * 1.5 / (ns[0] * 0.8)) ** (i / 50) for i in range(51)]
    ax.plot(grid, [math.exp(log_a) * g ** -alpha for g in grid], "-", color="gray", label=f"fit: loss ∝ N^-{alpha:.3f}")
    ax.plot(ns, losses, "o", label="builtin s / m / l (K = 1)")
    ax.plot([e["equivalent_parameters"] for e in equivalent], [e["loss"] for e in equivalent], "x",
            label="builtin:s + RoE (K = 1..32)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "quality_scaling.png", dpi=100)
    out["seconds"] = round(time.time() - started)
    (HERE / "results" / "quality.json").write_text(json.dumps(out, indent=1))
    write_reports(out)


def write_reports(out):
    fam, cmp_, sweep, sc = out["family"], out["roe_vs_base"], out["sweep"], out["scaling"]
    n = out["args"]["limit"]
    seeds = out["args"]["seeds"]
    fam_md = ["| model | parameters | training (tokens, seconds, device) | final train loss | validation loss | "
              "math | choice | code | test ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for f in fam:
        fam_md.append(f"| builtin:{f['size']} | {f['parameters'] / 1e6:.2f}M | {f['tokens'] / 1e6:.0f}M, {f['train_seconds']:.0f}s, "
                      f"{f['device']} | {f['final_train_loss']:.4f} | {f['validation_loss']:.4f} | {f['math']:.3f} | "
                      f"{f['choice']:.3f} | {f['code']:.3f} | {f['ppl']:.4f} |")
    cmp_md = ["| task | metric | base (K = 1) | RoE mean ± std over seeds | difference | beyond seed noise (> 2 std) |",
              "|---|---|---|---|---|---|"]
    for t, c in cmp_.items():
        metric = "perplexity (lower is better)" if t == "ppl" else "accuracy"
        cmp_md.append(f"| {t} | {metric} | {c['base']:.4f} | {fmt(c['roe_mean'], c['roe_std'])} | {c['diff']:+.4f} | "
                      f"{'yes' if c['beyond_seed_noise'] else 'no'} |")
    prof = out["profile"]
    common = (f"Test split, first {n} items per category ({n} documents for perplexity); RoE = the shipped profile "
              f"(K = {prof['num_samples']}, tau = {prof['tau']}, clean cache, mean of probabilities), chosen on the "
              f"validation split; {seeds} seeds. Command: `.venv/bin/python benchmarks/quality.py` "
              f"({out['seconds']} s on the 2-core CPU machine).")
    builtin = ["# The built-in model family\n",
               "OLMoE architecture (`OlmoeForCausalLM`), 16 experts, top-4, load-balancing loss 0.01, a 764-token byte-level "
               "BPE with single digits, trained with `roe train-builtin` on the same 39M-token stream of the task suite "
               "(2400 steps x 64 x 256 tokens), stored as bfloat16 safetensors, loaded in float32.\n", common + "\n",
               "## Sizes\n", *fam_md, "", "## Base against RoE on builtin:s\n", *cmp_md, "", NOTES_BUILTIN]
    (HERE / "RESULTS-builtin.md").write_text("\n".join(builtin) + "\n")
    sweep_md = ["| tau | " + " | ".join(f"{s['tau']:.2f}" for s in sweep) + " |", "|---|" + "---|" * len(sweep),
                "| math acc | " + " | ".join(f"{s['math']:.2f}" for s in sweep) + " |",
                "| choice acc | " + " | ".join(f"{s['choice']:.2f}" for s in sweep) + " |",
                "| ppl | " + " | ".join(f"{s['ppl']:.4f}" for s in sweep) + " |"]
    eq_md = ["| system | test loss | equivalent parameters | ms/token | peak MiB |", "|---|---|---|---|---|"]
    for e in sc["roe"]:
        eq_md.append(f"| builtin:s RoE K = {e['k']} | {e['loss']:.5f} | {e['equivalent_parameters'] / 1e6:.3f}M | "
                     f"{e['ms_per_token']:.2f} | {e['peak_mem_bytes'] / 2**20:.0f} |")
    for b in sc["base_models"]:
        eq_md.append(f"| builtin:{b['size']} (K = 1) | - | {b['parameters'] / 1e6:.3f}M (actual) | {b['ms_per_token']:.2f} | "
                     f"{b['peak_mem_bytes'] / 2**20:.0f} |")
    quality = ["# The paper's claims, checked on the built-in family\n", common + "\n",
               "## 1. RoE against the base model (tuned on validation, measured on test)\n", *cmp_md, "",
               "## 2. Accuracy against a uniform tau (K = %d, seed 0, first %d items)\n" % (prof["num_samples"], out["args"]["sweep_limit"]),
               *sweep_md, "", "![tau sweep](quality_tau_sweep.png)\n",
               "## 3. Equivalent model size\n",
               f"Power law fitted to the three sizes' test loss: loss = {sc['a']:.4f} * N^-{sc['alpha']:.4f}. "
               "Each RoE row is placed on that curve by its own test loss; latency and memory from `roe bench`'s "
               "loop (64 prompt tokens, 64 new tokens) in the same run.\n", *eq_md, "",
               "![scaling](quality_scaling.png)\n", NOTES_QUALITY]
    (HERE / "RESULTS-quality.md").write_text("\n".join(quality) + "\n")


NOTES_BUILTIN = (HERE / "quality_notes_builtin.md").read_text() if (HERE / "quality_notes_builtin.md").exists() else ""
NOTES_QUALITY = (HERE / "quality_notes.md").read_text() if (HERE / "quality_notes.md").exists() else ""

if __name__ == "__main__":
    main()
