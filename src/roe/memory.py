"""An up-front bound on K: a pass whose step cannot fit in memory is refused before anything is allocated.

A RoE step runs rows = B * K * S rows through the model (B prompts, K samples, S positions: 1 for a decode
step, the chunk width for scoring). The estimate adds the tensors of one step that grow with the rows, from the
model's config:

    logits       rows x V, in the model's dtype, plus aggregate's FLOAT32_COPIES float32 copies
    noise        MoE layers x rows x E float32 Gumbel draws (all noisy layers' noise is made at once)
    experts      rows x top_k x 2 x I (the gate/up projections' output and its activation), model dtype
    attention    rows x query heads x (capacity + K) float32 scores and a bool mask (eager decoding appends
                 the K samples' own keys to the history, so this term is quadratic in K)
    full cache   B x K x layers x 2 x KV heads x head size x capacity, model dtype (the clean cache's history
                 is one per prompt, not per sample, and is left out: it does not grow with K)

These are the tensors as the eager path materialises them. Measured on a CPU (the built-in model, float32, one
prompt, attention-dominated): the process's peak grew by 0.70x the estimate at K = 4000 and 0.51x at K = 16000
(SDPA's CPU kernel holds less than full float32 scores), so the refusal can come up to ~2x early where attention
dominates, and activations of the hidden size and the allocator's slack are left out where it does not. The
limit is the memory free on the model's device now: `torch.cuda.mem_get_info` plus what PyTorch's caching
allocator holds unused on CUDA, the system's available memory (psutil, or the page counts of sysconf) on a CPU;
other devices are not checked. The point is the clear line for a K that cannot run (K = 10**9 would ask for
~1e19 bytes), not an exact accounting near the limit.
"""

from __future__ import annotations

import os

import torch

from .adapters import expert_count, text_config
from .score import FLOAT32_COPIES, logit_width


MIN_CHECKED = 1 << 26  # bytes: a step under 64 MiB is never refused (not worth asking the system each pass)


def _read(cfg, name: str):
    """`cfg.name`, or its largest value over the layers where a heterogeneous config (Gemma 4) keeps it per layer
    and refuses a global read."""
    try:
        return getattr(cfg, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        values = [getattr(layer, name, None) for layer in getattr(cfg, "per_layer_config", None) or ()]
        values = [v for v in values if isinstance(v, int)]
        return max(values, default=None)


def _field(cfg, *names, default=0) -> int:
    for name in names:
        value = _read(cfg, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def step_terms(model, batch: int, k: int, positions: int, capacity: int, full_cache: bool,
               moe_layers: int) -> dict[str, int]:
    """Bytes of the largest tensors of one step of `batch` prompts x `k` samples x `positions` (see above)."""
    cfg = text_config(model.config)
    vocab, logit_bytes = logit_width(model)
    elem = getattr(model, "dtype", torch.float32).itemsize
    rows = batch * k * positions
    heads = _field(cfg, "num_attention_heads", "n_head", default=1)
    kv_heads = _field(cfg, "num_key_value_heads", default=heads)
    head_dim = _field(cfg, "head_dim", default=max(1, _field(cfg, "hidden_size", "d_model") // heads))
    inter = _field(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
    terms = {
        "logits": rows * vocab * (logit_bytes + 4 * FLOAT32_COPIES),
        "noise": moe_layers * rows * (expert_count(model.config) or 1) * 4,
        "experts": rows * _field(cfg, "num_experts_per_tok", "moe_topk", "top_k", default=1) * 2 * inter * elem,
        # eager decoding folds a prompt's K queries into one SDPA call over the history and the K own keys:
        # float32 scores [B, H, K, capacity + K] and a bool mask [B, 1, K*G, capacity + K], quadratic in K
        "attention": rows * (capacity + k) * (heads * 4 + heads // kv_heads),
    }
    if full_cache:
        layers = _field(cfg, "num_hidden_layers", "n_layer", default=1)
        terms["full cache"] = batch * k * layers * 2 * kv_heads * head_dim * capacity * elem
    return terms


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` now (None: not known for this kind of device)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def check_step_fits(model, batch: int, k: int, positions: int, capacity: int, full_cache: bool,
                    moe_layers: int) -> None:
    """ValueError (one line: the estimate, the limit, what to change) if one step cannot fit in memory."""
    device = next(model.parameters()).device
    terms = step_terms(model, batch, k, positions, capacity, full_cache, moe_layers)
    need = sum(terms.values())
    if need < MIN_CHECKED:
        return
    free = free_bytes(device)
    if free is None or need <= free:
        return
    largest = max(terms, key=terms.get)
    rows = f"{batch} prompt(s) x K = {k}" + (f" x {positions} positions" if positions > 1 else "")
    raise ValueError(f"{rows} needs about {need:.3g} bytes per step ({largest}: {terms[largest]:.3g}), more than "
                     f"the {free:.3g} free on {device.type}: lower K (num_samples) or the batch")
