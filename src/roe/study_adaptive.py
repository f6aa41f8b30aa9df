"""`roe study --adaptive`: adaptive K against fixed K at matched cost.

Each variant (`--adaptive entropy:0.5,margin:0.9`) is RoE at the study's main K with the tuned tau whose noisy
samples take effect only where the clean path is uncertain (RoEConfig.adaptive_metric / adaptive_threshold).
It is evaluated on the same test items and seeds as fixed K, and its cost is measured in the same cost unit.

Cost here is what a decode step reads: the distinct experts the K rows of a prompt route to, per MoE layer per
step (`roe.bench.distinct_experts`), which is what a grouped expert kernel reads and what bounds a GPU decode
step. A skipped token's noisy rows route exactly as its clean row, so they add no expert. The matched fixed K
is the fixed K (>= 2) whose experts read per step is nearest to the variant's; the report gives the variant
minus that fixed K, paired per item, with the same bootstrap CI and verdict as RoE minus base, next to both
configurations' tokens/s in this run (which on a CPU whose dispatch reads every expert shows no saving).
"""

from __future__ import annotations

from .config import ADAPTIVE_METRICS, RoEConfig


def parse_variants(text: str | None) -> list[dict]:
    """'entropy:0.5,margin:0.9' -> [{"adaptive_metric": "entropy", "adaptive_threshold": 0.5}, ...]."""
    if not text:
        return []
    variants = []
    for part in (p.strip() for p in text.split(",")):
        metric, colon, value = part.partition(":")
        try:
            threshold = float(value)
        except ValueError:
            threshold = None
        if not colon or metric not in ADAPTIVE_METRICS or threshold is None:
            raise ValueError(f"--adaptive takes METRIC:THRESHOLD[,...] with METRIC one of "
                             f"{', '.join(ADAPTIVE_METRICS)}, got {part!r}")
        v = {"adaptive_metric": metric, "adaptive_threshold": threshold}
        RoEConfig(num_samples=2, tau=0.1, cache="clean", **v)  # the engine's ranges: one-line ValueError
        variants.append(v)
    if len({label(v) for v in variants}) < len(variants):
        raise ValueError("--adaptive lists the same variant twice")
    return variants


def label(variant: dict) -> str:
    return f"{variant['adaptive_metric']} {variant['adaptive_threshold']:g}"


def check_compatible(args, roster) -> None:
    """Fixed K must be fixed: an adaptive roster config (--adaptive-metric, a profile's) would make every row
    adaptive, and adaptive K runs under the clean cache only."""
    if not args.adaptive:
        return
    if roster.config.adaptive_metric is not None:
        raise ValueError("--adaptive compares adaptive K with fixed K: drop --adaptive-metric (or the profile's "
                         "adaptive K, with --adaptive-metric off)")
    if roster.config.cache != "clean":
        raise ValueError("--adaptive needs the clean cache (adaptive K runs under it only): pass --cache clean")


def experts_per_step(roster, prompts: list, steps: int = 16) -> float:
    """Distinct experts the K rows of a prompt route to, per MoE layer per decode step (the mean over the MoE
    layers and the prompts, each decoded `steps` greedy tokens)."""
    from .bench import distinct_experts

    per_prompt = [distinct_experts(roster, p, steps) for p in prompts]
    return sum(sum(layers) / len(layers) for layers in per_prompt) / len(per_prompt)


def matched_fixed(fixed: list[dict], variant_cost: dict | None) -> dict | None:
    """The fixed-K comparison row (K >= 2) whose experts read per step is nearest the variant's (ties: lower K)."""
    if not variant_cost or not fixed:
        return None
    target = variant_cost["experts_per_layer_step"]
    return min(fixed, key=lambda r: (abs(r["cost"]["experts_per_layer_step"] - target), r["k"]))


def compare_variants(rows: list[dict], comparison: dict, costs: dict, args) -> list[dict]:
    """Per variant: quality over seeds, minus base and minus the matched fixed K (paired per item), and cost."""
    import statistics

    import numpy as np

    base = next(r for r in rows if r["k"] == 1)
    diff = _differ(base, args)
    per_item = {}  # fixed K -> [items, seeds]
    for k in {r["k"] for r in comparison["roe"]}:
        per_item[k] = np.array([r["values"] for r in rows if r["k"] == k and not r.get("adaptive")]).T
    fixed = [r for r in comparison["roe"] if r["cost"] and "experts_per_layer_step" in r["cost"]]
    out = []
    for name in dict.fromkeys(r["adaptive"] for r in rows if r.get("adaptive")):
        group = sorted((r for r in rows if r.get("adaptive") == name), key=lambda r: r["seed"])
        values = np.array([r["values"] for r in group]).T  # [items, seeds]
        cost = costs.get(name)
        match = matched_fixed(fixed, cost)
        row = {"variant": name, "k": group[0]["k"], "value": statistics.fmean(r["value"] for r in group),
               "std_over_seeds": statistics.stdev(r["value"] for r in group) if len(group) > 1 else 0.0,
               "seeds": len(group), "per_seed": [r["value"] for r in group], "difference": diff(values, base["values"]),
               "cost": cost, "matched_k": None if match is None else match["k"]}
        if match is not None:
            row["difference_vs_matched"] = diff(values, per_item[match["k"]])
        out.append(row)
    return out


def _differ(base: dict, args):
    """paired_difference with the study's level, weights, direction and resamples bound."""
    from .stats import paired_difference

    def diff(values, reference):
        return paired_difference(values, reference, base["weights"], args.level, base["higher_is_better"],
                                 args.bootstrap_resamples, seed=0)
    return diff


def report_lines(result: dict) -> list[str]:
    """The report's section: one row per (task, variant), its matched fixed K, both costs and the paired CIs."""
    if not any(t["comparison"].get("adaptive") for t in result["tasks"].values()):
        return []
    lines = ["## Adaptive K vs fixed K at matched cost", "",
             "| task | config | quality (mean ± sd over seeds) | minus base [CI] | verdict | matched fixed K | "
             "minus matched fixed K [CI] | verdict | experts/layer/step | tokens/s |", "|" + "---|" * 10]
    for name, task in result["tasks"].items():
        c = task["comparison"]
        fixed = {r["k"]: r for r in c["roe"]}
        bc = c["base"]["cost"] or {}
        lines.append(f"| {name} | base (K = 1) | {c['base']['value']:.4f} | - | - | - | - | - "
                     f"| {_num(bc.get('experts_per_layer_step'))} | {_num(bc.get('tokens_per_s'), 1)} |")
        for r in c["roe"]:
            lines.append(_row(name, f"fixed K = {r['k']}", r, None))
        for v in c.get("adaptive", []):
            lines.append(_row(name, f"adaptive K = {v['k']}, {v['variant']}", v, fixed.get(v["matched_k"])))
    lines += ["", "experts/layer/step: the distinct experts the K rows of a prompt route to per MoE layer per decode "
              "step (the mean over up to 8 of the task's test prompts, 16 greedy steps each), what a grouped expert kernel reads; the matched "
              "fixed K is the one whose figure is nearest the adaptive variant's. tokens/s: this run, this "
              "machine (a CPU dispatch that computes every expert on every row reads all of them whatever the "
              "routing, so there adaptive K saves no time).", ""]
    return lines


def _row(task: str, config: str, r: dict, matched: dict | None) -> str:
    cost = r["cost"] or {}
    d = r["difference"]
    vs = r.get("difference_vs_matched")
    match = "-" if matched is None else f"{matched['k']} ({_num(matched['cost'].get('experts_per_layer_step'))})"
    return (f"| {task} | {config} | {r['value']:.4f} ± {r['std_over_seeds']:.4f} | {_ci(d)} | {d['verdict']} "
            f"| {match} | {_ci(vs) if vs else '-'} | {vs['verdict'] if vs else '-'} "
            f"| {_num(cost.get('experts_per_layer_step'))} | {_num(cost.get('tokens_per_s'), 1)} |")


def _ci(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
