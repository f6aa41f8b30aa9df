"""`roe bench`: decode latency, throughput and memory of RoE against the base model and two baselines.

Every configuration runs the same minimal greedy loop (prefill, then one forward
per new token, argmax of the aggregated distribution) in one process, so the
ratios between rows are comparable. Methods:

base         the plain transformers model with its own cache (no RoE hooks active)
roe          the batched engine: B*K rows per forward, clean or full cache
independent  K separate cached forwards per step, one per sample (full-cache semantics, no batching)
naive        no cache: the whole sequence recomputed K times per step (only small K, few tokens)

Every configuration is measured `repeats` times in interleaved rounds (so slow
drift of a shared machine hits all of them alike) and the median run is kept.
`--ablations` adds RoE rows with one engine optimisation switched off each, the
"before" of its before/after pair.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from .adapters import ACTIVE, RoutingNoise, find_experts
from .engine import aggregate, cache_bytes
from .routing import gumbel


@dataclass
class BenchRow:
    method: str
    k: int
    cache: str | None
    new_tokens: int
    tokens_per_s: float
    ms_per_token: float
    prefill_ms: float
    peak_mem_bytes: int
    kv_cache_bytes: int | None
    distinct_experts_per_layer: float | None
    weight_bytes_per_token: float | None = None  # the least a decode step reads (see weight_bytes_per_token)
    kernels_per_token: int | None = None  # operations a decode step dispatches (see kernels_per_token)
    # the experts implementation configured on the model for this row; an "optimised" RoE row on top of the default
    # grouped_mm lets the engine pick the dispatch per layer shape (experts.py)
    experts: str | None = None
    engine: str = "optimised"  # "optimised", or which engine optimisation this row switches off
    repeats: int = 1
    ms_per_token_min: float | None = None  # spread of the repeats
    ms_per_token_max: float | None = None


# engine optimisations that can be switched off, by the name a row reports
ABLATIONS = {
    "no shared layers": dict(share_layers=False),
    "history copied K times": dict(fold_samples=False),
    "transformers' expert dispatch": dict(choose_dispatch=False),
    "none of these": dict(share_layers=False, fold_samples=False, choose_dispatch=False),
}


class PeakMemory:
    """Peak process RSS (CPU, sampled every 2 ms) or peak allocated CUDA memory during a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _noise_for_one_row(roster, g: torch.Generator, seq: int):
    per_layer = [None if t == 0 else gumbel((seq, e), g).to(roster.model.device) * t
                 for t, e in zip(roster.taus, roster.num_experts)]
    return RoutingNoise(per_layer, torch.ones(seq, 1, dtype=torch.bool, device=roster.model.device))


def run_base(roster, prompt, new_tokens):
    model, device = roster.model, roster.model.device
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, past_key_values=cache, use_cache=True).logits
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, cache_bytes(cache)


def run_roe(roster, prompt, new_tokens, record=False, **engine_options):
    device = roster.model.device
    run = roster.new_pass([roster.config.seed], record_experts=record, **engine_options)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    t0 = time.perf_counter()
    run.prefill(prompt[:, :-1], mask[:, :-1])
    cur = prompt[:, -1:]
    logits = run.forward(cur)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        cur = aggregate(logits[:, :, -1], roster.config.aggregate).argmax(-1, keepdim=True)
        logits = run.forward(cur)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, run.kv_cache_bytes(), run


def run_independent(roster, prompt, new_tokens):
    """K separate cached forwards per step; sample 0 clean, the others with their own noise."""
    model, device, k = roster.model, roster.model.device, roster.config.num_samples
    g = torch.Generator().manual_seed(roster.config.seed)
    caches = [DynamicCache(config=model.config) for _ in range(k)]

    def step(ids, j, **kw):
        token = ACTIVE.set(_noise_for_one_row(roster, g, ids.shape[1]) if j else None)
        try:
            return model(ids, past_key_values=caches[j], use_cache=True, **kw).logits[:, -1:]
        finally:
            ACTIVE.reset(token)

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = torch.stack([step(prompt, j, logits_to_keep=1) for j in range(k)], 1)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = aggregate(logits[:, :, -1], roster.config.aggregate).argmax(-1, keepdim=True)
            logits = torch.stack([step(nxt, j) for j in range(k)], 1)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, sum(cache_bytes(c) for c in caches)


def run_naive(roster, prompt, new_tokens):
    """No cache at all: every step recomputes the whole sequence once per sample."""
    model, device, k = roster.model, roster.model.device, roster.config.num_samples
    g = torch.Generator().manual_seed(roster.config.seed)
    seq = prompt

    def all_samples(ids):
        out = []
        for j in range(k):
            token = ACTIVE.set(_noise_for_one_row(roster, g, ids.shape[1]) if j else None)
            try:
                out.append(model(ids, use_cache=False, logits_to_keep=1).logits[:, -1:])
            finally:
                ACTIVE.reset(token)
        return torch.stack(out, 1)

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = all_samples(seq)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = aggregate(logits[:, :, -1], roster.config.aggregate).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = all_samples(seq)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, 0


def distinct_experts(roster, prompt, steps: int = 16) -> list[float]:
    """Per MoE layer: the mean number of distinct experts the K rows touch in one decode step."""
    _, _, _, run = run_roe(roster, prompt, steps, record=True)
    counts = [[] for _ in roster.taus]
    for forward in run.chosen[1:]:  # decode steps (the first forward is the prompt's last token)
        for layer, idx in enumerate(forward):
            if idx is not None:
                counts[layer].append(len(set(idx.flatten().tolist())))  # rows before the fan-out layer are shared
    return [sum(c) / len(c) for c in counts if c]


class _KernelCounter(TorchDispatchMode):
    """Counts the operations that compute something; views and no-op casts (which alias their input) are left out.
    On a GPU each counted operation is one kernel launch, which is what a small decode step is bound by."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            self.count += 1
        return func(*args, **(kwargs or {}))


def kernels_per_token(roster, prompt, method: str, **engine_options) -> int:
    """Operations one greedy decode step dispatches (forward, aggregation, argmax): a count, not a timing, so it
    is the same on every run and every machine; the base model's count against RoE's is the launch overhead RoE
    adds on a device where a decode step is bound by kernel launches."""
    with torch.inference_mode():
        if method == "base":
            cache = DynamicCache(config=roster.model.config)
            roster.model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            with _KernelCounter() as counter:
                logits = roster.model(prompt[:, -1:], past_key_values=cache, use_cache=True).logits
                logits[:, -1].argmax(-1, keepdim=True)
            return counter.count
        run = roster.new_pass([roster.config.seed], **engine_options)
        run.prefill(prompt[:, :-1], torch.ones_like(prompt[:, :-1], dtype=torch.bool))
        run.forward(prompt[:, -1:])
        with _KernelCounter() as counter:
            logits = run.forward(prompt[:, -1:])
            aggregate(logits[:, :, -1], roster.config.aggregate).argmax(-1, keepdim=True)
        return counter.count


def weight_bytes_per_token(model, experts_per_layer: list[float]) -> float:
    """The weight bytes one decode step must read at the least: every weight outside the routed experts once,
    and in each MoE layer the experts some row chose (the input embedding reads one row: left out). On a device
    whose decode step is bound by memory bandwidth this is the floor of its latency; its ratio to the base
    model's is the floor of RoE's latency ratio."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel() * embed.element_size()
    for experts, distinct in zip(find_experts(model), experts_per_layer):
        expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
        total += expert_bytes * (distinct / experts.num_experts - 1)
    return total


def measure(roster, method: str, k: int, cache: str | None, prompt, new_tokens: int, engine: str = "optimised",
            experts: str | None = None) -> BenchRow:
    r = roster.with_config(num_samples=k, cache=cache or "clean")
    device = roster.model.device
    config = roster.model.config
    default = config._experts_implementation
    experts = experts or default
    config._experts_implementation = experts
    try:
        with PeakMemory(device) as mem:
            if method == "base":
                prefill, decode, kv = run_base(r, prompt, new_tokens)
            elif method == "roe":
                prefill, decode, kv, _ = run_roe(r, prompt, new_tokens, **ABLATIONS.get(engine, {}))
            elif method == "independent":
                prefill, decode, kv = run_independent(r, prompt, new_tokens)
            else:
                prefill, decode, kv = run_naive(r, prompt, new_tokens)
    finally:
        config._experts_implementation = default
    return BenchRow(method, k, cache, new_tokens, new_tokens / decode, 1000 * decode / new_tokens, 1000 * prefill,
                    mem.peak, kv if method != "naive" else None, None, experts=experts, engine=engine)


def _median_row(runs: list[BenchRow]) -> BenchRow:
    runs = sorted(runs, key=lambda r: r.ms_per_token)
    row = runs[len(runs) // 2]
    row.repeats = len(runs)
    row.ms_per_token_min, row.ms_per_token_max = runs[0].ms_per_token, runs[-1].ms_per_token
    row.peak_mem_bytes = max(r.peak_mem_bytes for r in runs)
    return row


def random_olmoe_1b_7b(device: str, dtype=torch.bfloat16):
    """A random-weight model with OLMoE-1B-7B's shape, for GPU timing without the checkpoint."""
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    from .builtin import builtin_path

    cfg = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                      max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OlmoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), AutoTokenizer.from_pretrained(builtin_path("s"))


def run_bench(roster, ks, caches, prompt_tokens, new_tokens, naive_ks, naive_tokens, independent_ks, warmup=True,
              experts_impls=(), ablations=False, repeats=1):
    device = roster.model.device
    g = torch.Generator().manual_seed(0)
    vocab = min(roster.model.config.vocab_size, len(roster.tokenizer))
    prompt = torch.randint(4, vocab, (1, prompt_tokens), generator=g).to(device)
    default = roster.model.config._experts_implementation
    # (method, K, cache, new tokens, engine variant, experts implementation), in the order of the table
    configs = [("base", 1, None, new_tokens, "optimised", None)]
    configs += [("roe", k, cache, new_tokens, "optimised", None) for k in ks for cache in caches]
    if ablations:
        configs += [("roe", k, "clean", new_tokens, name, None) for k in ks if k > 1 for name in ABLATIONS]
        if "full" in caches:  # the full cache's share of the engine: its leading layers' compute and history
            configs += [("roe", k, "full", new_tokens, "no shared layers", None) for k in ks if k > 1]
    configs += [("independent", k, "full", new_tokens, "optimised", None) for k in independent_ks]
    for k in naive_ks:
        configs += [("naive", k, None, naive_tokens, "optimised", None),
                    ("roe", k, "clean", naive_tokens, "optimised", None)]  # same-length RoE row for the ratio
    for impl in experts_impls:  # the expert dispatch, compared on the same shapes (clean cache)
        if impl != default:
            configs += [("base", 1, None, new_tokens, "optimised", impl)]
            configs += [("roe", k, "clean", new_tokens, "optimised", impl) for k in ks if k > 1]
    configs.append(("base", 1, None, new_tokens, "last", None))  # at the end: drift shows as a gap to the first
    configs = list(dict.fromkeys(configs))  # e.g. the naive baseline's RoE row when it has the full length
    if warmup:  # kernel selection, allocator growth and clocks settle before anything is timed
        measure(roster, "base", 1, None, prompt, 32)
        measure(roster, "roe", max(ks), caches[0], prompt, 8)
    runs: dict[tuple, list[BenchRow]] = {c: [] for c in configs}
    for _ in range(repeats):
        for c in configs:
            method, k, cache, tokens, engine, impl = c
            runs[c].append(measure(roster, method, k, cache, prompt, tokens, "optimised" if engine == "last" else engine,
                                   impl))
    rows = [_median_row(runs[c]) for c in configs]
    counted = {}  # the counts depend on the method, K, cache and expert dispatch, not on the repeat or the timing
    config = roster.model.config
    for c, row in zip(configs, rows):
        method, k, cache, tokens, engine, impl = c
        if method in ("base", "roe") and engine in ("optimised", "last"):
            key = (method, k, cache, impl)
            if key not in counted:
                r = roster.with_config(num_samples=k, cache=cache or "clean")
                per_layer = distinct_experts(r, prompt)
                config._experts_implementation = impl or default
                try:
                    kernels = kernels_per_token(r, prompt, method)
                finally:
                    config._experts_implementation = default
                counted[key] = (sum(per_layer) / len(per_layer), weight_bytes_per_token(roster.model, per_layer), kernels)
            row.distinct_experts_per_layer, row.weight_bytes_per_token, row.kernels_per_token = counted[key]
    return rows


def reference_base(rows: list[BenchRow]) -> BenchRow:
    """The faster of the base runs (first and last): ratios against it are conservative for RoE."""
    default = rows[0].experts
    return max((r for r in rows if r.method == "base" and r.experts == default), key=lambda r: r.tokens_per_s)


def print_table(rows: list[BenchRow], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = reference_base(rows)
    table = Table(title=title)
    for col in ("method", "K", "cache", "engine", "experts impl", "tokens", "tok/s", "x base", "ms/token",
                "prefill ms", "peak MiB", "KV KiB", "experts/layer", "weights read", "kernels"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.method, str(r.k), r.cache or "-", r.engine if r.method == "roe" else "-", r.experts or "-",
                      str(r.new_tokens), f"{r.tokens_per_s:.1f}",
                      f"{r.tokens_per_s / base.tokens_per_s:.2f}", f"{r.ms_per_token:.2f}", f"{r.prefill_ms:.1f}",
                      f"{r.peak_mem_bytes / 2**20:.0f}", "-" if r.kv_cache_bytes is None else f"{r.kv_cache_bytes / 1024:.0f}",
                      "-" if r.distinct_experts_per_layer is None else f"{r.distinct_experts_per_layer:.2f}",
                      "-" if r.weight_bytes_per_token is None
                      else f"{r.weight_bytes_per_token / base.weight_bytes_per_token:.2f}x",
                      "-" if r.kernels_per_token is None else str(r.kernels_per_token))
    Console(width=160).print(table)


def cmd_bench(args) -> int:
    from .options import load_roster
    from .roster import RosterOfExperts

    ks = [int(k) for k in args.k.split(",")] if args.k else [1, 8, 32, 64]
    caches = args.caches.split(",")
    if not caches or any(c not in ("clean", "full") for c in caches):
        raise ValueError(f"--cache takes clean, full or clean,full; got {args.caches!r}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.model == "random-olmoe-1b-7b":
        model, tok = random_olmoe_1b_7b(args.device)
        roster = RosterOfExperts(model, tok, __import__("roe").RoEConfig(tau=args.tau or 0.5, skip_layers=1))
    else:
        if args.tau is None:
            args.tau = 0.5  # large enough that noisy samples really pick other experts
        roster = load_roster(args)
    torch.manual_seed(0)
    rows = run_bench(roster, ks, caches, args.prompt_tokens, args.new_tokens,
                     [int(k) for k in args.naive_k.split(",")] if args.naive_k else [],
                     args.naive_tokens, [int(k) for k in args.independent_k.split(",")] if args.independent_k else [],
                     experts_impls=args.experts_impls.split(",") if args.experts_impls else (),
                     ablations=args.ablations, repeats=args.repeats)
    device = str(roster.model.device)
    if device == "cpu":
        device += f" ({torch.get_num_threads()} threads)"
    else:
        device += f" ({torch.cuda.get_device_name()})"
    title = f"roe bench: {args.model}, tau={roster.config.tau}, {args.prompt_tokens} prompt tokens, {device}"
    print_table(rows, title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


def add_parser(sub) -> None:
    from .options import add_roe_options

    p = sub.add_parser("bench", help="latency, throughput and memory of RoE against the base model")
    add_roe_options(p, k_list=True, cache_list=True)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--independent-k", default="8", help="K values for the K-independent-passes baseline")
    p.add_argument("--naive-k", default="8", help="K values for the no-cache baseline (slow: keep small)")
    p.add_argument("--naive-tokens", type=int, default=16, help="new tokens for the no-cache baseline")
    p.add_argument("--experts-impls", default="", help="also measure these transformers experts implementations "
                   "(eager, batched_mm, grouped_mm), comma-separated")
    p.add_argument("--ablations", action="store_true", help="also measure RoE with each engine optimisation "
                   "switched off (the before/after rows)")
    p.add_argument("--repeats", type=int, default=1, help="measure every row this many times (interleaved) and "
                   "keep the median")
    p.add_argument("--json", help="write the rows as JSON")
    p.set_defaults(func=cmd_bench)
