"""`roe bench`: decode latency, throughput, memory and power of RoE against the base model and baselines.

RoE, the base model and the RoE-style baselines run the same minimal greedy loop (prefill, then one forward per
new token, argmax of the aggregated distribution) in one process, so the ratios between rows are comparable.
The two `hf-*` rows are what a user would otherwise run: transformers' own `model.generate` (greedy), measured
in the same run. Methods:

base         the plain transformers model with its own cache, driven by the loop above (RoE's hooks inactive)
hf-eager     `model.generate(..., do_sample=False)` on the model with RoE's hooks removed
hf-compiled  the same with `cache_implementation="static"`: transformers compiles the decode step itself
             (torch.compile, mode reduce-overhead) on CUDA/XPU; elsewhere it runs the static cache eagerly
             and the row's `note` says so
roe          the batched engine: B*K rows per forward, clean or full cache; compiled per `--compile`
independent  K separate cached forwards per step, one per sample (full-cache semantics, no batching)
naive        no cache: the whole sequence recomputed K times per step (only small K, few tokens)

Every configuration is measured `repeats` times in interleaved rounds (so slow drift of a shared machine hits
all of them alike) and the median run is kept. `--batch-sizes 1,16` adds a row set with 16 prompts decoded
together (base, hf-eager, hf-compiled and RoE at each `--batch-k`); their tokens/s count the tokens of all
prompts and their ms/token is one decode step. `--ablations` adds RoE rows with one engine optimisation switched
off each, the "before" of its before/after pair.

Every row carries its tokens/s ratio to the reference base row (`x_base`: the faster of the first and last base
runs) and to the `hf-compiled` row (`x_hf_compiled`), both of the same batch size. A row that may compile
(hf-compiled; RoE with compile on, or auto on CUDA) is run once untimed before its first timed run; `compile_s`
is that first run's wall time minus the kept run's (compilation plus any other once-per-shape cost such as CUDA
graph capture). On CUDA with `nvidia-ml-py` installed, the GPU's energy counter is read through NVML around each
decode loop: `power_w` (average) and `energy_j_per_token` (per generated token); otherwise they are null and
`power_note` says why.

The `KV KiB` column is everything a pass stores between steps: keys/values, and on a hybrid the recurrent and
convolution states too (the clean cache keeps one per prompt, so the column is flat in K). Two random-weight
models need no checkpoint: `--model random-olmoe-1b-7b` (OLMoE-1B-7B's shape, for GPU timing) and
`--model random-qwen3-next-tiny` (a CPU-sized Qwen3-Next hybrid: Gated DeltaNet and full attention).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from . import adapters
from .adapters import ACTIVE, RoutingNoise, cache_kwargs, find_experts
from .engine import aggregate, cache_bytes
from .routing import NOISE_VERSION, gumbel

HF_METHODS = ("hf-eager", "hf-compiled")


@dataclass
class BenchRow:
    method: str
    k: int
    cache: str | None
    new_tokens: int
    tokens_per_s: float  # generated tokens per second, all prompts of the batch together
    ms_per_token: float  # one decode step (a token for each prompt of the batch)
    prefill_ms: float
    peak_mem_bytes: int
    kv_cache_bytes: int | None
    distinct_experts_per_layer: float | None
    weight_bytes_per_token: float | None = None  # the least a decode step reads (see weight_bytes_per_token)
    kernels_per_token: int | None = None  # operations an eager decode step dispatches (see kernels_per_token)
    # the experts implementation configured on the model for this row; an "optimised" RoE row on top of the default
    # grouped_mm lets the engine pick the dispatch per layer shape (experts.py)
    experts: str | None = None
    engine: str = "optimised"  # "optimised", or which engine optimisation this row switches off
    repeats: int = 1
    ms_per_token_min: float | None = None  # spread of the repeats
    ms_per_token_max: float | None = None
    batch: int = 1  # prompts decoded together
    compiled: bool = False  # the decode step ran torch.compile'd code
    compile_s: float | None = None  # first (untimed) run minus the kept run, seconds; only for rows that compiled
    x_base: float | None = None  # tokens/s over the reference base row's, same batch size
    x_hf_compiled: float | None = None  # tokens/s over the hf-compiled row's, same batch size
    power_w: float | None = None  # average GPU power during the decode loop (NVML)
    energy_j_per_token: float | None = None  # GPU energy of the decode loop per generated token (NVML)
    power_note: str | None = None  # how power was read, or why it was not
    note: str | None = None  # anything else a reader of this row should know


@dataclass
class _Run:
    prefill_s: float
    decode_s: float
    kv: int | None
    joules: float | None = None  # GPU energy during the decode loop
    compiled: bool = False
    note: str | None = None


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


def _nvml_index(device: torch.device) -> int:
    """NVML's index of a CUDA device (they differ from CUDA's when CUDA_VISIBLE_DEVICES reorders or hides GPUs)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return torch.cuda._get_nvml_device_index(index)
    except Exception:  # a private helper: fall back to CUDA's numbering
        return index


class PowerMeter:
    """The GPU's cumulative energy in joules through NVML (`pynvml`, from the `nvidia-ml-py` package).

    `energy()` is None when it cannot be read (not a CUDA device, pynvml not installed, NVML failing); `note` says
    why, or how it is read. The total-energy counter (Volta and newer) is read directly; where it is not supported
    a thread samples the power every 5 ms and integrates it. Optional: the bench never fails for want of it.
    """

    def __init__(self, device: torch.device):
        self._nvml = self._handle = self._thread = None
        self._joules = 0.0
        if device.type != "cuda":
            self.note = f"not measured: NVML reads NVIDIA GPUs, this run is on {device.type}"
            return
        try:
            import pynvml
        except ImportError:
            self.note = "not measured: pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
        except Exception as e:  # pynvml.NVMLError and its many subclasses
            self.note = f"not measured: NVML unavailable ({e})"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.note = "NVML total energy counter, read before and after each decode loop"
            self._counter = True
        except Exception:
            self.note = "NVML power usage sampled every 5 ms and integrated (no energy counter on this GPU)"
            self._counter = False
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        last = time.perf_counter()
        while not self._stop.wait(0.005):
            try:
                watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000  # mW
            except Exception:
                continue
            now = time.perf_counter()
            self._joules += watts * (now - last)
            last = now

    def energy(self) -> float | None:
        if self._nvml is None:
            return None
        if self._counter:
            try:
                return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000  # mJ
            except Exception:
                return None
        return self._joules

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


class _NoMeter:
    def energy(self):
        return None


def _joules(e0, e1):
    return None if e0 is None or e1 is None else e1 - e0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _without_roe_hooks(model):
    """The model exactly as a user has it (RoE's hooks removed), its hooks put back afterwards."""
    hooked = getattr(model, "_roe_hooks", None) is not None
    adapters.unpatch(model)
    try:
        yield model
    finally:
        if hooked:
            adapters.patch(model)


def _noise_for_one_row(roster, g: torch.Generator, seq: int):
    per_layer = [None if t == 0 else gumbel((seq, e), g).to(roster.model.device) * t
                 for t, e in zip(roster.taus, roster.num_experts)]
    return RoutingNoise(per_layer, torch.ones(seq, 1, dtype=torch.bool, device=roster.model.device))


def run_base(roster, prompt, new_tokens, meter=_NoMeter()) -> _Run:
    model, device = roster.model, roster.model.device
    cache = DynamicCache(config=model.config)
    with_cache = cache_kwargs(model, cache)  # read off the signature once, outside the timed loop
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(prompt, **with_cache, use_cache=True, logits_to_keep=1).logits
        _sync(device)
        t1, e1 = time.perf_counter(), meter.energy()
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, **with_cache, use_cache=True).logits
        _sync(device)
        t2, e2 = time.perf_counter(), meter.energy()
    return _Run(t1 - t0, t2 - t1, cache_bytes(cache), _joules(e1, e2))


class _DecodeStart(LogitsProcessor):
    """A logits processor that changes nothing: it notes the time (and energy) when `generate` has the prompt's
    logits, i.e. when the prefill is done and the decode loop begins."""

    def __init__(self, device, meter):
        self.device, self.meter = device, meter
        self.time = self.energy = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            _sync(self.device)
            self.time, self.energy = time.perf_counter(), self.meter.energy()
        return scores


def run_hf(roster, prompt, new_tokens, static: bool, meter=_NoMeter()) -> _Run:
    """transformers' own greedy `generate` on the model without RoE's hooks: what a user would otherwise run.

    One `generate` of new_tokens + 1 tokens: the prefill is timed up to the prompt's logits (the first call of a
    logits processor that changes nothing), the decode loop from there to the end, i.e. new_tokens forwards of
    one token each, like the other methods. static: `cache_implementation="static"`, which is what makes
    transformers compile the decode step (on CUDA/XPU)."""
    model, device = roster.model, roster.model.device
    start = _DecodeStart(device, meter)
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=roster.pad_token_id,
              max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
              logits_processor=LogitsProcessorList([start]))
    if static:
        kw["cache_implementation"] = "static"
    compiled = []  # generate asks for its compiled forward only when it will decode with it
    own = getattr(model, "get_compiled_call", None)
    before = model.__dict__.get("_compiled_call")

    def spy(*args, **kwargs):
        compiled.append(True)
        return own(*args, **kwargs)

    with _without_roe_hooks(model), torch.inference_mode():
        if own is not None:
            model.get_compiled_call = spy
        try:
            t0 = time.perf_counter()
            out = model.generate(prompt, **kw)
            _sync(device)
            t2, e2 = time.perf_counter(), meter.energy()
        finally:
            if own is not None:
                del model.get_compiled_call
    if own is None and model.__dict__.get("_compiled_call") is not before:  # another transformers version
        compiled.append(True)
    if out.shape[1] != prompt.shape[1] + new_tokens + 1 or start.time is None:
        raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, not {new_tokens + 1}")
    note = None
    if static and not compiled:
        note = (f"transformers compiles generate's decode step only on CUDA/XPU/TPU/Neuron devices: on {device.type} "
                "this is the static cache, run eagerly")
    return _Run(start.time - t0, t2 - start.time, None, _joules(start.energy, e2), bool(compiled), note)


def run_roe(roster, prompt, new_tokens, record=False, meter=_NoMeter(), **engine_options):
    """RoE's greedy loop for the prompts of `prompt` [B, T] (prompt b gets seed config.seed + b).
    Returns (_Run, the RoEPass)."""
    device = roster.model.device
    seed = roster.config.seed
    run = roster.new_pass([seed + b for b in range(prompt.shape[0])], record_experts=record,
                          capacity=prompt.shape[1] + new_tokens + 1, **engine_options)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    t0 = time.perf_counter()
    run.prefill(prompt[:, :-1], mask[:, :-1])
    logprobs = run.decode(prompt[:, -1:])  # [B, V], aggregated
    _sync(device)
    t1, e1 = time.perf_counter(), meter.energy()
    for _ in range(new_tokens):
        logprobs = run.decode(logprobs.argmax(-1, keepdim=True))
    _sync(device)
    t2, e2 = time.perf_counter(), meter.energy()
    # the engine says whether its decode step ran compiled (RoEPass.compiled); an engine without one ran eagerly
    compiled = bool(getattr(run, "compiled", False))
    return _Run(t1 - t0, t2 - t1, run.kv_cache_bytes(), _joules(e1, e2), compiled), run


def run_independent(roster, prompt, new_tokens, meter=_NoMeter()) -> _Run:
    """K separate cached forwards per step; sample 0 clean, the others with their own noise."""
    model, device, k = roster.model, roster.model.device, roster.config.num_samples
    g = torch.Generator().manual_seed(roster.config.seed)
    caches = [DynamicCache(config=model.config) for _ in range(k)]
    with_caches = [cache_kwargs(model, c) for c in caches]  # read off the signature once, outside the timed loop

    def step(ids, j, **kw):
        token = ACTIVE.set(_noise_for_one_row(roster, g, ids.shape[1]) if j else None)
        try:
            return model(ids, **with_caches[j], use_cache=True, **kw).logits[:, -1:]
        finally:
            ACTIVE.reset(token)

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = torch.stack([step(prompt, j, logits_to_keep=1) for j in range(k)], 1)
        _sync(device)
        t1, e1 = time.perf_counter(), meter.energy()
        for _ in range(new_tokens):
            nxt = aggregate(logits[:, :, -1], roster.config.aggregate).argmax(-1, keepdim=True)
            logits = torch.stack([step(nxt, j) for j in range(k)], 1)
        _sync(device)
        t2, e2 = time.perf_counter(), meter.energy()
    return _Run(t1 - t0, t2 - t1, sum(cache_bytes(c) for c in caches), _joules(e1, e2))


def run_naive(roster, prompt, new_tokens, meter=_NoMeter()) -> _Run:
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
        t1, e1 = time.perf_counter(), meter.energy()
        for _ in range(new_tokens):
            nxt = aggregate(logits[:, :, -1], roster.config.aggregate).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = all_samples(seq)
        _sync(device)
        t2, e2 = time.perf_counter(), meter.energy()
    return _Run(t1 - t0, t2 - t1, None, _joules(e1, e2))


def _eager(roster):
    """The same roster with the decode step never compiled (counting operations, recording experts)."""
    r = roster.with_config()
    r.compile = "off"
    return r


def distinct_experts(roster, prompt, steps: int = 16) -> list[float]:
    """Per MoE layer: the mean number of distinct experts the K rows touch in one decode step."""
    _, run = run_roe(_eager(roster), prompt, steps, record=True)
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


# operations that make the host wait for the device: a scalar read back, or an output whose shape depends on data
SYNCING_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
               "_unique", "_unique2", "unique_consecutive", "unique_dim"}


class HostWaits(TorchDispatchMode):
    """Records every operation dispatched (`ops`) and those that make the host wait for the device (`waits`):
    syncing operations and copies from an accelerator to the host. A static decode step must have none."""

    def __init__(self):
        super().__init__()
        self.ops, self.waits = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in SYNCING_OPS:
            self.waits.append(name)
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.waits.append(f"{name} {src.device}->cpu")
        return func(*args, **kwargs)


def kernels_per_token(roster, prompt, method: str, **engine_options) -> int:
    """Operations one greedy decode step dispatches (forward, aggregation, argmax), run eagerly: a count, not a
    timing, so it is the same on every run and every machine; the base model's count against RoE's is the launch
    overhead RoE adds on a device where a decode step is bound by kernel launches (before any compilation)."""
    with torch.inference_mode():
        if method == "base":
            with_cache = cache_kwargs(roster.model, DynamicCache(config=roster.model.config))
            roster.model(prompt, **with_cache, use_cache=True, logits_to_keep=1)
            with _KernelCounter() as counter:
                logits = roster.model(prompt[:, -1:], **with_cache, use_cache=True).logits
                logits[:, -1].argmax(-1, keepdim=True)
            return counter.count
        run = _eager(roster).new_pass([roster.config.seed], **engine_options)
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
            experts: str | None = None, meter=None, compile: str | None = None) -> BenchRow:
    """One run of one configuration. prompt [B, T]: B prompts decoded together. compile overrides the roster's
    mode for RoE rows (the untimed warm-ups run eagerly so that they compile nothing)."""
    r = roster.with_config(num_samples=k, cache=cache if cache in ("clean", "full") else "clean")
    if compile is not None:
        r.compile = compile
    meter = meter or _NoMeter()
    device = roster.model.device
    config = roster.model.config
    default = config._experts_implementation
    experts = experts or default
    config._experts_implementation = experts
    try:
        with PeakMemory(device) as mem:
            if method == "base":
                run = run_base(r, prompt, new_tokens, meter)
            elif method in HF_METHODS:
                run = run_hf(r, prompt, new_tokens, static=method == "hf-compiled", meter=meter)
            elif method == "roe":
                run, _ = run_roe(r, prompt, new_tokens, meter=meter, **ABLATIONS.get(engine, {}))
            elif method == "independent":
                run = run_independent(r, prompt, new_tokens, meter)
            else:
                run = run_naive(r, prompt, new_tokens, meter)
    finally:
        config._experts_implementation = default
    batch = prompt.shape[0]
    tokens = new_tokens * batch
    row = BenchRow(method, k, cache, new_tokens, tokens / run.decode_s, 1000 * run.decode_s / new_tokens,
                   1000 * run.prefill_s, mem.peak, run.kv, None, experts=experts, engine=engine, batch=batch,
                   compiled=run.compiled, note=run.note)
    if run.joules is not None:
        row.power_w = run.joules / run.decode_s
        row.energy_j_per_token = run.joules / tokens
    row.power_note = getattr(meter, "note", None)
    return row


def _median_row(runs: list[BenchRow]) -> BenchRow:
    runs = sorted(runs, key=lambda r: r.ms_per_token)
    row = BenchRow(**asdict(runs[len(runs) // 2]))  # a copy: the runs stay as measured
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


def random_qwen3_next_tiny(device: str, dtype=torch.float32):
    """A random-weight hybrid of Qwen3-Next's layout (three Gated DeltaNet layers, then full attention, twice; 32
    experts, top 4, a shared expert) at a CPU-sized width, for the hybrid row set: stored state bytes per K and
    RoE's cost on recurrent layers. Its router logits get a spread of ~2 so that noise changes some choices."""
    from transformers import AutoTokenizer, Qwen3NextConfig, Qwen3NextForCausalLM

    from .builtin import builtin_path

    tok = AutoTokenizer.from_pretrained(builtin_path("s"))
    cfg = Qwen3NextConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
                          linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=64,
                          linear_value_head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
                          shared_expert_intermediate_size=256, intermediate_size=512, decoder_sparse_step=1,
                          mlp_only_layers=[], vocab_size=len(tok), max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3NextForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # [E, hidden]: logits of std ~2 over the experts
                p.normal_(0, 2 / cfg.hidden_size**0.5)
    return model.eval(), tok


RANDOM_MODELS = {"random-olmoe-1b-7b": random_olmoe_1b_7b, "random-qwen3-next-tiny": random_qwen3_next_tiny}


def may_compile(roster) -> bool:
    """Whether RoE's decode step can be compiled under the roster's mode on its device."""
    mode = getattr(roster, "compile", "off")
    return mode == "on" or (mode == "auto" and roster.model.device.type == "cuda")


def reference_base(rows: list[BenchRow], batch: int = 1) -> BenchRow | None:
    """The faster of the base runs (first and last) of a batch size: ratios against it are conservative for RoE."""
    default = rows[0].experts if rows else None
    bases = [r for r in rows if r.method == "base" and r.experts == default and r.batch == batch]
    return max(bases, key=lambda r: r.tokens_per_s) if bases else None


def reference_hf_compiled(rows: list[BenchRow], batch: int = 1) -> BenchRow | None:
    return next((r for r in rows if r.method == "hf-compiled" and r.batch == batch), None)


def add_ratios(rows: list[BenchRow]) -> None:
    """x_base and x_hf_compiled of every row: its tokens/s over the reference row's of the same batch size."""
    for row in rows:
        base, hf = reference_base(rows, row.batch), reference_hf_compiled(rows, row.batch)
        row.x_base = None if base is None else row.tokens_per_s / base.tokens_per_s
        row.x_hf_compiled = None if hf is None else row.tokens_per_s / hf.tokens_per_s


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(roster, ks, caches, prompt_tokens, new_tokens, naive_ks, naive_tokens, independent_ks, warmup=True,
              experts_impls=(), ablations=False, repeats=1, batch_sizes=(1,), batch_ks=(8,), hf_baselines=True,
              meter=None, checkpoint=None, log=_log):
    """All rows of one bench run. checkpoint(rows, complete): called with the rows so far after every measurement
    (complete=False) and at the end (True), e.g. to save partial results of a run that may be cut off."""
    device = roster.model.device
    meter = meter or _NoMeter()
    g = torch.Generator().manual_seed(0)
    vocab = min(roster.model.config.vocab_size, len(roster.tokenizer))
    prompt = torch.randint(4, vocab, (1, prompt_tokens), generator=g)
    prompts = {1: prompt.to(device)}
    for b in sorted(set(batch_sizes) - {1}):  # the first prompt of every batch is the single-prompt rows' prompt
        prompts[b] = torch.cat([prompt, torch.randint(4, vocab, (b - 1, prompt_tokens), generator=g)]).to(device)
    prompt = prompts[1]
    default = roster.model.config._experts_implementation
    hf = [(m, 1, "static" if m == "hf-compiled" else None, new_tokens, "optimised", None, 1)
          for m in HF_METHODS] if hf_baselines else []
    # (method, K, cache, new tokens, engine variant, experts implementation, batch), in the order of the table
    configs = [("base", 1, None, new_tokens, "optimised", None, 1), *hf]
    configs += [("roe", k, cache, new_tokens, "optimised", None, 1) for k in ks for cache in caches]
    if ablations:
        configs += [("roe", k, "clean", new_tokens, name, None, 1) for k in ks if k > 1 for name in ABLATIONS]
        if "full" in caches:  # the full cache's share of the engine: its leading layers' compute and history
            configs += [("roe", k, "full", new_tokens, "no shared layers", None, 1) for k in ks if k > 1]
    configs += [("independent", k, "full", new_tokens, "optimised", None, 1) for k in independent_ks]
    for k in naive_ks:
        configs += [("naive", k, None, naive_tokens, "optimised", None, 1),
                    ("roe", k, "clean", naive_tokens, "optimised", None, 1)]  # same-length RoE row for the ratio
    for impl in experts_impls:  # the expert dispatch, compared on the same shapes (clean cache)
        if impl != default:
            configs += [("base", 1, None, new_tokens, "optimised", impl, 1)]
            configs += [("roe", k, "clean", new_tokens, "optimised", impl, 1) for k in ks if k > 1]
    batch_cache = "clean" if "clean" in caches else caches[0]
    for b in sorted(set(batch_sizes) - {1}):  # the batched row set: b prompts decoded together
        configs += [("base", 1, None, new_tokens, "optimised", None, b)]
        configs += [(m, k, c, t, e, i, b) for m, k, c, t, e, i, _ in hf]
        configs += [("roe", k, batch_cache, new_tokens, "optimised", None, b) for k in batch_ks]
    configs.append(("base", 1, None, new_tokens, "last", None, 1))  # at the end: drift shows as a gap to the first
    configs = list(dict.fromkeys(configs))  # e.g. the naive baseline's RoE row when it has the full length
    compiles = may_compile(roster)
    first_run = {}  # config -> wall seconds of its untimed first run (rows that may compile)
    if warmup:  # kernel selection, allocator growth and clocks settle before anything is timed (compiling nothing)
        t0 = time.perf_counter()
        measure(roster, "base", 1, None, prompt, 32)
        measure(roster, "roe", max(ks), caches[0], prompt, 8, compile="off")
        if hf_baselines:
            measure(roster, "hf-eager", 1, None, prompt, 8)
        log(f"[bench] warm-up: {time.perf_counter() - t0:.1f} s")

    runs: dict[tuple, list[BenchRow]] = {c: [] for c in configs}

    def current_rows(complete: bool) -> list[BenchRow]:
        rows = [_median_row(runs[c]) for c in configs if runs[c]]
        for c, row in zip([c for c in configs if runs[c]], rows):
            if row.compiled and c in first_run:
                row.compile_s = max(0.0, first_run[c] - (row.prefill_ms + row.ms_per_token * row.new_tokens) / 1000)
        add_ratios(rows)
        return rows

    start = time.perf_counter()
    for rnd in range(repeats):
        for c in configs:
            method, k, cache, tokens, engine, impl, batch = c
            engine = "optimised" if engine == "last" else engine
            if rnd == 0 and (method == "hf-compiled" or (method == "roe" and compiles)):
                t0 = time.perf_counter()  # the first run of this shape: compiles it (timed as a whole, kept apart)
                first = measure(roster, method, k, cache, prompts[batch], tokens, engine, impl)
                first_run[c] = first.prefill_ms / 1000 + first.ms_per_token * first.new_tokens / 1000
                log(f"[bench] first run of {method} K={k} {cache or '-'} batch {batch}: "
                    f"{time.perf_counter() - t0:.1f} s{' (compiled)' if first.compiled else ''}")
            row = measure(roster, method, k, cache, prompts[batch], tokens, engine, impl, meter)
            runs[c].append(row)
            log(f"[bench {time.perf_counter() - start:7.1f} s] round {rnd + 1}/{repeats} {method} K={k} "
                f"{cache or '-'} {engine} {impl or ''} batch {batch}: {row.ms_per_token:.2f} ms/token, "
                f"{row.tokens_per_s:.1f} tok/s{' (compiled)' if row.compiled else ''}")
            if checkpoint is not None:
                checkpoint(current_rows(False), False)
    rows = current_rows(True)
    counted = {}  # the counts depend on the method, K, cache and expert dispatch, not on the repeat or the timing
    config = roster.model.config
    for c, row in zip(configs, rows):
        method, k, cache, tokens, engine, impl, batch = c
        if method in ("base", "roe") and engine in ("optimised", "last") and batch == 1:
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
    if checkpoint is not None:
        checkpoint(rows, True)
    return rows


COLUMNS = ("method", "K", "cache", "engine", "experts impl", "batch", "tokens", "tok/s", "x base", "x hf-compiled",
           "ms/token", "prefill ms", "compiled", "compile s", "peak MiB", "KV KiB", "W", "J/token", "experts/layer",
           "weights read", "kernels")


def table_rows(rows: list[BenchRow]) -> list[tuple[str, ...]]:
    base = reference_base(rows)

    def f(value, fmt, none="-"):
        return none if value is None else format(value, fmt)

    out = []
    for r in rows:
        read = "-" if r.weight_bytes_per_token is None or base is None or base.weight_bytes_per_token is None \
            else f"{r.weight_bytes_per_token / base.weight_bytes_per_token:.2f}x"
        out.append((r.method, str(r.k), r.cache or "-", r.engine if r.method == "roe" else "-", r.experts or "-",
                    str(r.batch), str(r.new_tokens), f"{r.tokens_per_s:.1f}", f(r.x_base, ".2f"),
                    f(r.x_hf_compiled, ".2f"), f"{r.ms_per_token:.2f}", f"{r.prefill_ms:.1f}",
                    "yes" if r.compiled else "no", f(r.compile_s, ".1f"), f"{r.peak_mem_bytes / 2**20:.0f}",
                    "-" if r.kv_cache_bytes is None else f"{r.kv_cache_bytes / 1024:.0f}", f(r.power_w, ".0f"),
                    f(r.energy_j_per_token, ".3f"), f(r.distinct_experts_per_layer, ".2f"), read,
                    f(r.kernels_per_token, "d")))
    return out


def print_table(rows: list[BenchRow], title: str) -> None:
    body = table_rows(rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # a machine with torch and transformers only: plain text
        widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]
        print(title)
        for line in (COLUMNS, *body):
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
    else:
        table = Table(title=title)
        for col in COLUMNS:
            table.add_column(col, justify="right")
        for line in body:
            table.add_row(*line)
        Console(width=250).print(table)
    notes = dict.fromkeys(f"{r.method}: {r.note}" for r in rows if r.note)
    notes.update(dict.fromkeys([f"power: {rows[0].power_note}"] if rows and rows[0].power_note else []))
    for note in notes:
        print(f"note: {note}")


def _versions() -> dict:
    import platform

    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def cmd_bench(args) -> int:
    from .options import load_roster, roe_config
    from .roster import RosterOfExperts

    ks = [int(k) for k in args.k.split(",")] if args.k else [1, 8, 32, 64]
    caches = args.caches.split(",")
    if not caches or any(c not in ("clean", "full") for c in caches):
        raise ValueError(f"--cache takes clean, full or clean,full; got {args.caches!r}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [1]
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    batch_ks = [int(k) for k in args.batch_k.split(",")] if args.batch_k else []
    compile = getattr(args, "compile", None) or "auto"
    # unset RoE flags fall back to --profile, then the model's shipped profile, then RoEConfig's defaults, as in
    # every other command
    if args.model in RANDOM_MODELS:
        model, tok = RANDOM_MODELS[args.model](args.device)
        roster = RosterOfExperts(model, tok, roe_config(args), compile=compile)
    else:
        roster = load_roster(args)
        roster.compile = compile
    if roster.config.adaptive_metric is not None and "full" in caches:
        raise ValueError("adaptive K runs under the clean cache only: pass --cache clean")
    torch.manual_seed(0)
    device = str(roster.model.device)
    if device == "cpu":
        device += f" ({torch.get_num_threads()} threads)"
    else:
        device += f" ({torch.cuda.get_device_name()})"
    title = f"roe bench: {args.model}, tau={roster.config.tau}, {args.prompt_tokens} prompt tokens, {device}"
    if roster.config.adaptive_metric is not None:  # RoE rows run adaptive K (benchmarks/adaptive_k.py compares)
        title += f", adaptive K: {roster.config.adaptive_metric} {roster.config.adaptive_threshold:g}"
    meter = PowerMeter(roster.model.device)

    def save(rows, complete):
        if args.json:
            doc = {"title": title, "complete": complete, "device": device, "compile": compile,
                   "power": meter.note, "versions": _versions(), "noise_version": NOISE_VERSION,
                   "rows": [asdict(r) for r in rows]}
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, args.json)

    try:
        rows = run_bench(roster, ks, caches, args.prompt_tokens, args.new_tokens,
                         [int(k) for k in args.naive_k.split(",")] if args.naive_k else [],
                         args.naive_tokens, [int(k) for k in args.independent_k.split(",")] if args.independent_k else [],
                         experts_impls=args.experts_impls.split(",") if args.experts_impls else (),
                         ablations=args.ablations, repeats=args.repeats, batch_sizes=batch_sizes, batch_ks=batch_ks,
                         hf_baselines=not args.no_hf, meter=meter, checkpoint=save)
    finally:
        meter.close()
    print_table(rows, title)
    return 0


def add_parser(sub) -> None:
    from .parsers import add_bench

    add_bench(sub)

