"""`roe study`'s report: study.json (everything), study.md (readable) and three PNG plots."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

from .study_adaptive import report_lines as adaptive_lines

PLOTS = ("quality_vs_k.png", "quality_vs_tau.png", "quality_vs_cost.png")


def _fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _ci(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def _main_k(task: dict, k: int) -> dict:
    return next(r for r in task["comparison"]["roe"] if r["k"] == k)


def verdict_table(result: dict, k: int) -> list[str]:
    lines = ["| task | metric | items | base | RoE | RoE minus base [CI] | verdict | tokens/s base / RoE "
             "| peak memory base / RoE | KV cache base / RoE |", "|" + "---|" * 10]
    for name, task in result["tasks"].items():
        c = task["comparison"]
        r = _main_k(task, k)
        bc, rc = c["base"]["cost"] or {}, r["cost"] or {}
        lines.append(f"| {name} | {c['metric']} | {c['n']} | {_fmt(c['base']['value'])} | {_fmt(r['value'])} "
                     f"± {_fmt(r['std_over_seeds'])} | {_ci(r['difference'])} | **{r['difference']['verdict']}** "
                     f"| {_fmt(bc.get('tokens_per_s'), 1)} / {_fmt(rc.get('tokens_per_s'), 1)} "
                     f"| {_mib(bc.get('peak_mem_bytes'))} / {_mib(rc.get('peak_mem_bytes'))} "
                     f"| {_mib(bc.get('kv_cache_bytes'))} / {_mib(rc.get('kv_cache_bytes'))} |")
    return lines


def k_table(result: dict) -> list[str]:
    lines = ["| task | K | quality (mean ± sd over seeds) | RoE minus base [CI] | verdict | ms/token |",
             "|" + "---|" * 6]
    for name, task in result["tasks"].items():
        c = task["comparison"]
        lines.append(f"| {name} | 1 (base) | {_fmt(c['base']['value'])} | - | - "
                     f"| {_fmt((c['base']['cost'] or {}).get('ms_per_token'), 2)} |")
        for r in c["roe"]:
            lines.append(f"| {name} | {r['k']} | {_fmt(r['value'])} ± {_fmt(r['std_over_seeds'])} "
                         f"| {_ci(r['difference'])} | {r['difference']['verdict']} "
                         f"| {_fmt((r['cost'] or {}).get('ms_per_token'), 2)} |")
    return lines


def tuning_lines(result: dict) -> list[str]:
    lines = ["| task | objective | trials | validation items | max tau | skipped layers | base (tau = 0) | best "
             "| tuned tau per MoE layer |", "|" + "---|" * 9]
    notes = []
    for name, t in result["tuning"].items():
        taus = ", ".join(f"{v:.3f}" for v in t["tau"])
        if "settings" not in t:
            lines.append(f"| {name} | - | - | - | - | - | - | - | {taus} (from {t['from']}) |")
            continue
        s = t["settings"]
        lines.append(f"| {name} | {t['objective']} ({t['direction']}) | {len(t['trials'])} | {t['validation_examples']} "
                     f"| {s['max_tau']} | {s['skip_layers']} | {_fmt(t['validation_score_base'])} "
                     f"| {_fmt(t['validation_score'])} | {taus} |")
        notes += [f"- {name}: {n}" for n in s["notes"]]
        if all(v == 0 for v in t["tau"]):
            notes.append(f"- {name}: no trial beat the base model on validation, so the tuned RoE is tau = 0 "
                         "(identical to the base model; its difference is 0 by construction)")
    return lines + ([""] + notes if notes else [])


def markdown(result: dict, args, roster, k: int) -> str:
    level = f"{100 * args.level:g}%"
    head = [f"# roe study: `{args.model}`", "",
            f"Command: `{result['command']}`", "",
            f"{result['date']}, {result['device']}, {result['seconds']} s; units of work: "
            f"{result['units']['computed']} computed, {result['units']['reused']} reused from `state.json`.", "",
            f"Base model: K = 1 (tau = 0). RoE: the tau tuned per task at K = {max(result['ks'])} (applied at every "
            f"K), K = {k} (main), seeds 0..{args.seeds - 1}.", "",
            "## Does RoE help?", "", *verdict_table(result, k), "",
            f"RoE minus base is the mean over test items of the per-item difference (each item's RoE value averaged "
            f"over the seeds, minus the base model's), with a {level} bootstrap confidence interval over items "
            f"(scipy.stats.bootstrap, paired, {args.bootstrap_resamples} resamples, BCa). Verdict: **helps** when "
            f"the whole interval is on the better side of 0, **hurts** when on the worse side, **no evidence** "
            "otherwise. Accuracy items score 0/1 (higher is better); perplexity is compared as log-perplexity "
            "(nats per token, documents weighted by their tokens; lower is better). Costs are measured in this "
            "run on this machine (`roe.bench.measure`: greedy decode, median of the repeats; base = the plain "
            "model with its own cache; peak memory is the process RSS on CPU, allocated memory on CUDA).", ""]
    body = ["## Quality vs K", "", *k_table(result), "", "![quality vs K](quality_vs_k.png)", "",
            *adaptive_lines(result),
            "## Tuning (validation split, Optuna TPE)", "", *tuning_lines(result), "",
            "![quality vs tau](quality_vs_tau.png)", "",
            "## Quality vs cost", "", "![quality vs cost](quality_vs_cost.png)", ""]
    return "\n".join(head + body)


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tasks"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.5), squeeze=False)
    for i, name in enumerate(names):
        c = result["tasks"][name]["comparison"]
        ks = [r["k"] for r in c["roe"]]
        ticks = dict(xscale="log", xticks=[1, *ks], xticklabels=["1", *map(str, ks)], xlim=(0.8, ks[-1] * 1.25))
        ax = axes[0][i]
        ax.errorbar([1, *ks], [c["base"]["value"]] + [r["value"] for r in c["roe"]],
                    yerr=[0] + [r["std_over_seeds"] for r in c["roe"]], fmt="o-", capsize=3, label="sd over seeds")
        ax.axhline(c["base"]["value"], color="gray", ls="--", lw=0.8, label="base (K = 1)")
        ax.set(title=name, ylabel=c["metric"], **ticks)
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax = axes[1][i]
        d = [r["difference"] for r in c["roe"]]
        ax.errorbar(ks, [x["mean"] for x in d], yerr=[[x["mean"] - x["ci_low"] for x in d],
                                                     [x["ci_high"] - x["mean"] for x in d]], fmt="o", capsize=3)
        ax.axhline(0, color="gray", lw=0.8)
        unit = "log-ppl" if c["higher_is_better"] is False else c["metric"]
        ax.set(xlabel="K", ylabel=f"RoE minus base, {unit} (CI)", **ticks)
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=100)
    plt.close(fig)
    return [out / PLOTS[0], _tau_plot(result, out, plt), _cost_plot(result, out, plt)]


def _tau_plot(result: dict, out: Path, plt) -> Path:
    tuned = {n: t for n, t in result["tuning"].items() if "trials" in t}
    fig, axes = plt.subplots(1, max(1, len(tuned)), figsize=(3.6 * max(1, len(tuned)), 3.2), squeeze=False)
    for ax, (name, t) in zip(axes[0], tuned.items()):
        middle = t["settings"]["skip_layers"], len(t["tau"]) - t["settings"]["skip_layers"]
        mean_tau = [sum(tr["tau"][middle[0] : middle[1]]) / (middle[1] - middle[0]) for tr in t["trials"]]
        ax.plot(mean_tau, [tr["value"] for tr in t["trials"]], "o", ms=4, alpha=0.6, label="trial")
        ax.plot(mean_tau[:1], [t["trials"][0]["value"]], "s", color="gray", label="base (tau = 0)")
        best = t["trials"].index(next(tr for tr in t["trials"] if tr["value"] == t["validation_score"]))
        ax.plot([mean_tau[best]], [t["validation_score"]], "*", ms=12, color="C3", label="best")
        ax.set(title=name, xlabel="mean tau of the tuned layers", ylabel=f"validation {t['objective']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=100)
    plt.close(fig)
    return out / PLOTS[1]


def _cost_plot(result: dict, out: Path, plt) -> Path:
    names = list(result["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        c = result["tasks"][name]["comparison"]
        points = [(1, c["base"]["value"], c["base"]["cost"])] + [(r["k"], r["value"], r["cost"]) for r in c["roe"]]
        points = [(k, v, cost["ms_per_token"]) for k, v, cost in points if cost]
        ax.plot([p[2] for p in points], [p[1] for p in points], "o-")
        for k, v, ms in points:
            ax.annotate(f"K={k}", (ms, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for a in (a for a in c.get("adaptive", []) if a["cost"]):  # adaptive K variants: their own markers
            ax.plot([a["cost"]["ms_per_token"]], [a["value"]], "s", color="C1")
            ax.annotate(a["variant"], (a["cost"]["ms_per_token"], a["value"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
        ax.set(title=name, xlabel="ms per token (decode)", ylabel=c["metric"])
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=100)
    plt.close(fig)
    return out / PLOTS[2]


def write_report(result: dict, args, roster) -> list[Path]:
    import torch
    import transformers

    out = Path(args.output)
    # `roe ...` or `python -m roe.cli ...`; else called from Python (tests), where argv is not ours
    started_as_roe = Path(sys.argv[0]).name == "roe" or sys.argv[0].endswith(str(Path("roe", "cli.py")))
    result["command"] = "roe " + shlex.join(sys.argv[1:]) if started_as_roe else "(roe.cli.main, from Python)"
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["device"] = str(roster.model.device) + ("" if roster.model.device.type != "cpu" else
                                                   f" ({torch.get_num_threads()} threads)")
    result["model"], result["model_type"] = args.model, roster.model.config.model_type
    result["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    result["versions"] = {"roe": __import__("roe").__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version()}
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    pngs = plots(result, out)
    (out / "study.md").write_text(markdown(result, args, roster, args.study_k))
    return [out / "study.json", out / "study.md", *pngs]
