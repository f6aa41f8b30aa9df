"""Gated DeltaNet layers (Qwen3-Next) under the clean cache, on vLLM's CPU kernels.

The engine's semantics (src/roe/state.py): a noisy row at position t reads the clean recurrent state after t-1
tokens and the clean convolution window, advances them by one step with its own input, uses the output, and
its updated state is never stored. vLLM keeps each request's state in one slot of its mamba-style state cache
(`layer.kv_cache = (conv_state, ssm_state)`, slot `non_spec_state_indices_tensor[r]`), which the clean rows
advance through the whole step. So before the clean rows run, the RoE tokens' slots are copied out; a
sequence in prefill then advances its copy over its prompt without the last token (vLLM's own prefill kernels,
on the copy); each copy is repeated K-1 times and every noisy row takes one decode step on its own copy (vLLM's
own decode kernels). The copies live in scratch tensors with the cache's strides, run through vLLM's CPU core
(`_cpu_gdn_attention_nonspec`) with metadata describing the scratch, so vLLM's real cache is only read.
At the first RoE step, the same path run on the clean rows must reproduce vLLM's own clean output.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def is_gdn(module: nn.Module) -> bool:
    from vllm.model_executor.layers.mamba.gdn.base import GatedDeltaNetAttention

    return isinstance(module, GatedDeltaNetAttention)


def check_supported(layer: nn.Module) -> str | None:
    """None, or why the plugin cannot run the noisy rows' step of this layer (one line)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "roe: Gated DeltaNet layers are ported to vLLM's CPU kernels only"
    if not hasattr(layer, "forward_cpu") or not getattr(layer, "gqa_interleaved_layout", False):
        return f"roe: this Gated DeltaNet layer ({type(layer).__name__}) is not ported (Qwen3-Next's is)"
    return None


def _project(layer, h: torch.Tensor):
    """The first part of vLLM's `forward_cpu` (Qwen3-Next's interleaved layout): (mixed_qkv, z, b, a)."""
    mixed_qkvz, _ = layer.in_proj_qkvz(h)
    ba, _ = layer.in_proj_ba(h)
    query, key, value, z, b, a = layer.fix_query_key_value_ordering(mixed_qkvz, ba)
    mixed_qkv = torch.cat([x.reshape(x.shape[0], -1) for x in (query, key, value)], dim=-1)
    return mixed_qkv, z, b, a


def _scratch(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """cache[rows] in a tensor with the cache's stride order (vLLM's kernels read the cache's layout)."""
    order = sorted(range(cache.dim()), key=lambda d: -cache.stride(d))  # outermost dimension first
    shape = (rows.numel(), *cache.shape[1:])
    out = cache.new_empty([shape[d] for d in order]).permute(*[order.index(d) for d in range(cache.dim())])
    out.copy_(cache[rows])
    return out


def _core(layer, conv, ssm, mixed_qkv, b, a, decodes: int, qsl: torch.Tensor, idx_dtype) -> torch.Tensor:
    """vLLM's CPU GDN core on scratch states: `decodes` one-token rows first, then prefills (qsl over them)."""
    from vllm.model_executor.layers.mamba.ops.cpu.gdn_attention import _cpu_gdn_attention_nonspec

    seqs = qsl.numel() - 1
    tokens = mixed_qkv.shape[0]
    meta = SimpleNamespace(
        spec_sequence_masks=None, num_accepted_tokens=None,
        non_spec_state_indices_tensor=torch.arange(seqs, dtype=idx_dtype, device=conv.device),
        non_spec_query_start_loc=qsl.to(torch.int32), num_decodes=decodes, num_decode_tokens=decodes,
        num_prefills=seqs - decodes, num_prefill_tokens=tokens - decodes,
        has_initial_state=torch.ones(seqs, dtype=torch.bool, device=conv.device),  # the copies are the states
    )
    proxy = SimpleNamespace(kv_cache=(conv, ssm), conv1d=layer.conv1d, activation=layer.activation,
                            rearrange_mixed_qkv=layer.rearrange_mixed_qkv, A_log=layer.A_log, dt_bias=layer.dt_bias)
    out = torch.zeros(tokens, layer.num_v_heads // layer.tp_size, layer.head_v_dim, dtype=mixed_qkv.dtype,
                      device=mixed_qkv.device)
    _cpu_gdn_attention_nonspec(proxy, meta, mixed_qkv.contiguous(), b.contiguous(), a.contiguous(), out)
    return out


def _states_before(layer, meta, step, clean: torch.Tensor, snap):
    """Each RoE sequence's (conv, ssm) copy advanced to the state before its RoE token."""
    conv, ssm = snap
    R = step.idx.numel()
    qsl = meta.non_spec_query_start_loc[: R + 1].long().cpu()
    first = int(meta.num_decodes)  # decodes first: their copies already are the state before the RoE token
    has_init = meta.has_initial_state
    rows, seqs, lens = [], [], []
    for r in range(first, R):
        if has_init is not None and not bool(has_init[r]):  # over all the batch's sequences
            conv[r].zero_()  # a new request: its history starts from zero states
            ssm[r].zero_()
        start, end = int(qsl[r]), int(qsl[r + 1]) - 1  # prompt tokens before the last
        if end > start:
            rows.append(torch.arange(start, end))
            seqs.append(r)
            lens.append(end - start)
    if seqs:
        take = torch.tensor(seqs, device=conv.device)
        sub_conv, sub_ssm = _scratch(conv, take), _scratch(ssm, take)
        mixed_qkv, _, b, a = _project(layer, clean[torch.cat(rows).to(clean.device)])
        sub_qsl = torch.tensor([0] + lens).cumsum(0)
        _core(layer, sub_conv, sub_ssm, mixed_qkv, b, a, 0, sub_qsl, meta.non_spec_state_indices_tensor.dtype)
        conv[take], ssm[take] = sub_conv, sub_ssm
    return conv, ssm


def noisy_step(layer, step, meta, snap, clean: torch.Tensor, noisy: torch.Tensor, k1: int) -> torch.Tensor:
    """noisy [R*k1, hidden] (k1 rows per RoE sequence) -> their layer outputs, from the clean states."""
    conv, ssm = _states_before(layer, meta, step, clean, snap)
    rows = torch.arange(conv.shape[0], device=conv.device).repeat_interleave(k1)
    conv, ssm = _scratch(conv, rows), _scratch(ssm, rows)
    mixed_qkv, z, b, a = _project(layer, noisy)
    E = noisy.shape[0]
    qsl = torch.arange(E + 1)
    core = _core(layer, conv, ssm, mixed_qkv, b, a, E, qsl, meta.non_spec_state_indices_tensor.dtype)
    return layer._output_projection(core, z)


def hook(model, layer: nn.Module) -> None:
    original = layer.forward
    checked = []

    def forward(hidden_states):
        from vllm.forward_context import get_forward_context

        step = model._roe_step
        if step is None or hidden_states.shape[0] != step.n + step.extra:
            return original(hidden_states)
        n, R = step.n, step.idx.numel()
        meta = get_forward_context().attn_metadata[layer.prefix]
        if meta.spec_sequence_masks is not None or meta.num_spec_decodes:
            raise RuntimeError("roe: speculative decoding is not supported with RoE")
        slots = meta.non_spec_state_indices_tensor[:R].long()
        snap = tuple(_scratch(c, slots) for c in layer.kv_cache[:2])  # before the clean rows advance them
        if not checked:  # the path below, on the clean rows, must give vLLM's clean output
            snap0 = tuple(x.clone() for x in snap)
        clean_in = hidden_states[:n]
        clean = original(clean_in)
        if not checked:
            mine = noisy_step(layer, step, meta, snap0, clean_in, clean_in[step.idx], 1)
            if not torch.allclose(mine.float(), clean[step.idx].float(), rtol=2e-2, atol=2e-2):
                raise RuntimeError(
                    "roe: the Gated DeltaNet states copied from vLLM's cache do not reproduce vLLM's own output; "
                    "RoE's clean cache cannot run this layer"
                )
            checked.append(True)
        out = noisy_step(layer, step, meta, snap, clean_in, hidden_states[n:], step.k - 1)
        return torch.cat([clean, out.to(clean.dtype)], dim=0)

    layer.forward = forward
