"""Turn `roe bench --json` files into benchmarks/RESULTS-perf.md tables and a plot of tokens/s and memory against K.

    roe bench --model builtin -k 1,8,32,64 --prompt-tokens 64 --new-tokens 128 --cache clean,full \
        --json benchmarks/results/perf-cpu-builtin.json
    python benchmarks/perf_report.py benchmarks/results/perf-cpu-builtin.json [more.json ...]
    python benchmarks/perf_report.py --md benchmarks/results/perf-gpu-h100.md benchmarks/results/perf-gpu-h100.json

(`benchmarks/run_perf.sh` and `benchmarks/run_perf_gpu.sh` do both.) Ratios are against rows of the same file and
the same batch size: "x base" against the faster of the two base runs, "x hf-compiled" against transformers' own
`generate` with a static cache (compiled on CUDA). `--md FILE` writes only the given files' tables and headline
comparisons to FILE and leaves RESULTS-perf.md and the plot alone. Needs only the standard library; the plot
needs matplotlib and is skipped (with a note) without it.
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent


def _batch(r):
    return r.get("batch", 1)


def reference_base(rows, batch=1):
    """The faster of the base runs with the default expert dispatch (the first row's) and this batch size."""
    default = rows[0].get("experts")
    bases = [r for r in rows if r["method"] == "base" and r.get("experts") == default and _batch(r) == batch]
    return max(bases, key=lambda r: r["tokens_per_s"]) if bases else None


def reference_hf(rows, batch=1):
    return next((r for r in rows if r["method"] == "hf-compiled" and _batch(r) == batch), None)


def _ratio(a, b, fmt=".2f"):
    return "-" if a is None or b is None or not b else format(a / b, fmt)


def _pct(a, b):
    return "-" if a is None or b is None or not b else f"{100 * (a / b - 1):+.1f}%"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


COLUMNS = ("method", "K", "cache", "engine", "experts impl", "batch", "new tokens", "tok/s", "x base tok/s",
           "x hf-compiled tok/s", "ms/token (min-max of repeats)", "x base latency", "x hf-compiled latency",
           "prefill ms", "compiled", "compile s", "peak MiB", "peak vs base", "peak vs hf-compiled", "KV KiB", "W",
           "J/token", "J/token x hf-compiled", "distinct experts/layer", "weights read x base", "kernels/step")


def table(doc):
    rows = doc["rows"]
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        base, hf = reference_base(rows, _batch(r)), reference_hf(rows, _batch(r))
        base1 = reference_base(rows)
        kv = "-" if r["kv_cache_bytes"] is None else f"{r['kv_cache_bytes'] / 1024:.0f}"
        de = _num(r["distinct_experts_per_layer"], ".2f")
        read = _ratio(r.get("weight_bytes_per_token"), base1 and base1.get("weight_bytes_per_token"))
        spread = f" ({r['ms_per_token_min']:.2f}-{r['ms_per_token_max']:.2f})" if r.get("repeats", 1) > 1 else ""
        engine = r.get("engine", "optimised") if r["method"] == "roe" else "-"
        compiled = {True: "yes", False: "no"}.get(r.get("compiled"), "-")
        cells = [r["method"], r["k"], r["cache"] or "-", engine, r.get("experts") or "-", _batch(r), r["new_tokens"],
                 f"{r['tokens_per_s']:.1f}", _ratio(r["tokens_per_s"], base and base["tokens_per_s"]),
                 _ratio(r["tokens_per_s"], hf and hf["tokens_per_s"]), f"{r['ms_per_token']:.2f}{spread}",
                 _ratio(r["ms_per_token"], base and base["ms_per_token"]),
                 _ratio(r["ms_per_token"], hf and hf["ms_per_token"]), f"{r['prefill_ms']:.1f}", compiled,
                 _num(r.get("compile_s"), ".1f"), f"{r['peak_mem_bytes'] / 2**20:.0f}",
                 _pct(r["peak_mem_bytes"], base and base["peak_mem_bytes"]),
                 _pct(r["peak_mem_bytes"], hf and hf["peak_mem_bytes"]), kv, _num(r.get("power_w"), ".0f"),
                 _num(r.get("energy_j_per_token"), ".3f"),
                 _ratio(r.get("energy_j_per_token"), hf and hf.get("energy_j_per_token")), de, read,
                 r.get("kernels_per_token") or "-"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = dict.fromkeys(f"`{r['method']}`: {r['note']}" for r in rows if r.get("note"))
    if doc.get("power"):
        notes[f"power: {doc['power']}"] = None
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out), reference_base(rows)


def _find(rows, method, k=1, cache=None, batch=1):
    return next((r for r in rows if r["method"] == method and r["k"] == k and _batch(r) == batch
                 and (cache is None or r["cache"] == cache) and r.get("engine", "optimised") == "optimised"
                 and r.get("experts") == rows[0].get("experts")), None)


def headline(doc):
    """The comparisons the performance issue asks for, read off one run (values only: the notes judge them)."""
    rows = doc["rows"]
    hf, base = reference_hf(rows), reference_base(rows)
    lines = []
    if hf is None:
        return lines
    ks = sorted({r["k"] for r in rows if r["method"] == "roe" and r["cache"] == "clean" and _batch(r) == 1})
    for k in ks:
        r = _find(rows, "roe", k, "clean")
        if r is not None:
            lines.append(f"- RoE K = {k}, clean cache: {r['ms_per_token']:.2f} ms/token, latency "
                         f"{_ratio(r['ms_per_token'], hf['ms_per_token'])}x hf-compiled "
                         f"({hf['ms_per_token']:.2f} ms/token) and {_ratio(r['ms_per_token'], base['ms_per_token'])}x "
                         f"base; compiled: {'yes' if r.get('compiled') else 'no'}")
    eager = _find(rows, "hf-eager")
    if eager is not None:
        lines.append(f"- hf-eager {eager['ms_per_token']:.2f} ms/token, hf-compiled {hf['ms_per_token']:.2f} ms/token "
                     f"(compiled: {'yes' if hf.get('compiled') else 'no'}), base loop {base['ms_per_token']:.2f}")
    k1, top = _find(rows, "roe", 1, "clean"), (_find(rows, "roe", ks[-1], "clean") if ks else None)
    if k1 is not None and top is not None and top is not k1:
        lines.append(f"- K = {top['k']} against K = 1 (clean cache): peak memory "
                     f"{_pct(top['peak_mem_bytes'], k1['peak_mem_bytes'])}, energy per token "
                     f"{_ratio(top.get('energy_j_per_token'), k1.get('energy_j_per_token'))}x, average power "
                     f"{_num(top.get('power_w'), '.0f')} W against {_num(k1.get('power_w'), '.0f')} W")
    for b in sorted({_batch(r) for r in rows} - {1}):
        hf_b = reference_hf(rows, b)
        for r in rows:
            if r["method"] == "roe" and _batch(r) == b and hf_b is not None:
                lines.append(f"- {b} prompts batched, RoE K = {r['k']}: {r['tokens_per_s']:.1f} tokens/s, "
                             f"{_ratio(r['tokens_per_s'], hf_b['tokens_per_s'])}x hf-compiled at the same batch "
                             f"({hf_b['tokens_per_s']:.1f} tokens/s)")
    compiles = [f"{r['method']} K = {r['k']} batch {_batch(r)}: {r['compile_s']:.1f} s" for r in rows
                if r.get("compile_s") is not None]
    if compiles:
        lines.append("- compile time (first run minus a timed run of the same shape): " + "; ".join(compiles))
    return lines


def plot(docs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: {path} not redrawn")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, doc in docs:
        rows = doc["rows"]
        base = reference_base(rows)
        for cache, style in (("clean", "-o"), ("full", "--s")):
            pts = sorted(((r["k"], r) for r in rows if r["method"] == "roe" and r["cache"] == cache and _batch(r) == 1
                          and r["new_tokens"] == base["new_tokens"] and r.get("experts") == base.get("experts")
                          and r.get("engine", "optimised") == "optimised"),
                         key=lambda kr: kr[0])
            if pts:
                ks = [k for k, _ in pts]
                a.plot(ks, [r["tokens_per_s"] / base["tokens_per_s"] for _, r in pts], style, label=f"{name} {cache}")
                b.plot(ks, [r["peak_mem_bytes"] / base["peak_mem_bytes"] for _, r in pts], style, label=f"{name} {cache}")
    for ax, title in ((a, "tokens/s relative to the base model"), (b, "peak memory relative to the base model")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (samples per token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sections(docs):
    parts = []
    for name, doc in docs:
        md, _ = table(doc)
        parts += [f"## {name}\n", f"{doc['title']}\n"]
        if doc.get("complete") is False:
            parts.append("**Incomplete run**: the rows measured before it stopped.\n")
        if doc.get("versions"):
            parts.append(", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "\n")
        lines = headline(doc)
        if lines:
            parts += ["\n".join(lines), ""]
        parts += [md, ""]
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--md", help="write these files' sections to this file only (RESULTS-perf.md and the plot stay)")
    args = p.parse_args(argv)
    docs = [(Path(f).stem.replace("perf-", ""), json.loads(Path(f).read_text())) for f in args.json]
    if args.md:
        Path(args.md).write_text("\n".join(["# roe bench\n", *sections(docs)]) + "\n")
        print(Path(args.md).read_text())
        return
    parts = ["# Performance results\n", "Regenerate with `bash benchmarks/run_perf.sh` (CPU) and, on a GPU machine, "
             "`bash benchmarks/run_perf_gpu.sh` (a random-weight model with OLMoE-1B-7B's shape, bf16); each ends by "
             "running `python benchmarks/perf_report.py benchmarks/results/perf-*.json`.\n",
             "![tokens/s and memory against K](perf.png)\n", *sections(docs)]
    notes = HERE / "perf_notes.md"  # the hand-written reading of the numbers
    if notes.exists():
        parts.insert(3, notes.read_text())
    (HERE / "RESULTS-perf.md").write_text("\n".join(parts) + "\n")
    plot(docs, HERE / "perf.png")
    print((HERE / "RESULTS-perf.md").read_text())


if __name__ == "__main__":
    main()
