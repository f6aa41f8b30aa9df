"""Turn `roe bench --json` files into benchmarks/RESULTS-perf.md tables and a plot of tokens/s and memory against K.

    roe bench --model builtin -k 1,8,32,64 --prompt-tokens 64 --new-tokens 128 --cache clean,full \
        --json benchmarks/results/perf-cpu-builtin.json
    python benchmarks/perf_report.py benchmarks/results/perf-cpu-builtin.json [more.json ...]

(`benchmarks/run_perf.sh` does both.) Ratios are against the faster of the two base runs in the same file.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def table(doc):
    rows = doc["rows"]
    base = max((r for r in rows if r["method"] == "base" and r.get("experts") == rows[0].get("experts")),
               key=lambda r: r["tokens_per_s"])
    out = ["| method | K | cache | engine | experts impl | new tokens | tok/s | x base tok/s | ms/token (min-max of repeats) | "
           "x base latency | prefill ms | peak MiB | peak vs base | KV KiB | distinct experts/layer | weights read x base | kernels/step |",
           "|" + "---|" * 17]
    for r in rows:
        kv = "-" if r["kv_cache_bytes"] is None else f"{r['kv_cache_bytes'] / 1024:.0f}"
        de = "-" if r["distinct_experts_per_layer"] is None else f"{r['distinct_experts_per_layer']:.2f}"
        read = "-" if r.get("weight_bytes_per_token") is None or base.get("weight_bytes_per_token") is None \
            else f"{r['weight_bytes_per_token'] / base['weight_bytes_per_token']:.2f}"
        spread = f" ({r['ms_per_token_min']:.2f}-{r['ms_per_token_max']:.2f})" if r.get("repeats", 1) > 1 else ""
        engine = r.get("engine", "optimised") if r["method"] == "roe" else "-"
        out.append(f"| {r['method']} | {r['k']} | {r['cache'] or '-'} | {engine} | {r.get('experts') or '-'} | {r['new_tokens']} | "
                   f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['ms_per_token']:.2f}{spread} | "
                   f"{r['ms_per_token'] / base['ms_per_token']:.2f} | {r['prefill_ms']:.1f} | "
                   f"{r['peak_mem_bytes'] / 2**20:.0f} | {100 * (r['peak_mem_bytes'] / base['peak_mem_bytes'] - 1):+.1f}% | {kv} | {de} | {read} | {r.get('kernels_per_token') or '-'} |")
    return "\n".join(out), base


def plot(docs, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, doc in docs:
        rows = doc["rows"]
        base = max((r for r in rows if r["method"] == "base" and r.get("experts") == rows[0].get("experts")),
                   key=lambda r: r["tokens_per_s"])
        for cache, style in (("clean", "-o"), ("full", "--s")):
            pts = sorted(((r["k"], r) for r in rows if r["method"] == "roe" and r["cache"] == cache
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


def main(paths):
    docs = [(Path(p).stem.replace("perf-", ""), json.loads(Path(p).read_text())) for p in paths]
    parts = ["# Performance results\n", "Regenerate with `bash benchmarks/run_perf.sh` (CPU) and, on a GPU machine, "
             "`bash benchmarks/run_perf_gpu.sh` (a random-weight model with OLMoE-1B-7B's shape, bf16); each ends by "
             "running `python benchmarks/perf_report.py benchmarks/results/perf-*.json`.\n",
             "![tokens/s and memory against K](perf.png)\n"]
    for name, doc in docs:
        md, base = table(doc)
        parts += [f"## {name}\n", f"{doc['title']}\n", md, ""]
    notes = HERE / "perf_notes.md"  # the hand-written reading of the numbers
    if notes.exists():
        parts.insert(3, notes.read_text())
    (HERE / "RESULTS-perf.md").write_text("\n".join(parts) + "\n")
    plot(docs, HERE / "perf.png")
    print((HERE / "RESULTS-perf.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
