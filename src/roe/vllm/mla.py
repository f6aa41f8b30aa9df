"""Multi-head latent attention (DeepSeek-V2/V3) under the clean cache.

vLLM's MLA layer (`MLAAttention.forward(q, kv_c_normed, k_pe)`) caches one latent row per token: the
compressed key/value `kv_c_normed` (kv_lora_rank) followed by the rotated rope key `k_pe` (qk_rope_head_dim).
The N clean rows go through vLLM's layer unchanged, so only their latents are written to the paged cache. A
noisy row at position t attends to the clean latents of positions < t, read from that cache through the block
table, plus its own latent for t, which is never stored. The attention runs in the latent space as vLLM's
decode does (the query's no-rope part absorbed through W_UK_T, the output expanded through W_UV): every head
shares the one latent row per position, so the history is read once per sequence for all K-1 samples.

Layout: CPU_MLA stores row `slot` of the cache viewed as [blocks * block_size, kv_lora_rank + rope] (its
`do_kv_cache_update`); `probe_layout_at_start` writes random latents with the backend's own update into a
scratch cache and reads them back before vLLM reports ready, and `check_layout` checks the first step's
stored latents. Other MLA backends (AMX_MLA, the GPU ones) are refused with one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .settings import RoESettingsError

READABLE = ("CPU_MLA",)
_USE = "start vLLM with attention_config={'backend': 'CPU_MLA'} (--attention-backend CPU_MLA)"


def is_mla(module: nn.Module) -> bool:
    from vllm.model_executor.layers.attention import MLAAttention

    return isinstance(module, MLAAttention)


def _cache(attn: nn.Module) -> torch.Tensor:
    kv = attn.kv_cache
    return kv[0] if isinstance(kv, (list, tuple)) else kv


def latent_view(attn: nn.Module, cache: torch.Tensor):
    """(block_size, read): read(blocks, slots) -> [..., kv_lora_rank + rope] for index tensors of one shape."""
    name = attn.attn_backend.get_name()
    if name not in READABLE:
        raise RoESettingsError(f"roe: the clean cache cannot read the latent cache of the {name} MLA backend; {_USE}")
    nb, bs, width = cache.shape  # [num_blocks, block_size, kv_lora_rank + rope] (vLLM binds it squeezed)
    return bs, (lambda b, s: cache[b, s])


def probe_layout_at_start(attn: nn.Module, vllm_config) -> None:
    """Before vLLM reports ready: random latents stored with the backend's own update must read back."""
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise RoESettingsError(
            "roe: quantized KV caches (--kv-cache-dtype) are not supported by the plugin; drop the flag"
        )
    if getattr(attn, "dcp_q_replicate", False) or getattr(attn.impl, "dcp_world_size", 1) > 1:
        raise RoESettingsError("roe: decode context parallelism with MLA is not supported by the plugin")
    dtype, bs = vllm_config.model_config.dtype, vllm_config.cache_config.block_size
    cache = torch.zeros(3, bs, attn.head_size, dtype=dtype)  # [blocks, block_size, 576]
    _, read = latent_view(attn, cache)
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(3 * bs, generator=gen)[: bs + 3]  # [T] scattered over all blocks
    kv_c = torch.randn(len(slots), attn.kv_lora_rank, generator=gen).to(dtype)
    k_pe = torch.randn(len(slots), 1, attn.qk_rope_head_dim, generator=gen).to(dtype)
    attn.impl.do_kv_cache_update(kv_c, k_pe, cache, slots, "auto", None)
    if not torch.equal(read(slots // bs, slots % bs), torch.cat([kv_c, k_pe[:, 0]], dim=-1)):
        raise RoESettingsError(
            f"roe: vLLM's {attn.attn_backend.get_name()} backend stores latents in a layout the plugin does not read"
        )


def check_layout(attn: nn.Module, step, kv_c: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Once per process: the latents vLLM just stored for the RoE tokens read back at their slots."""
    from vllm.forward_context import get_forward_context

    slots = get_forward_context().slot_mapping.get(attn.layer_name)
    bs, read = latent_view(attn, _cache(attn))
    s = slots[step.idx].long()
    want = torch.cat([kv_c[step.idx], k_pe[step.idx].reshape(len(s), -1)], dim=-1).float()
    if not torch.allclose(read(s // bs, s % bs).float(), want, rtol=1e-2, atol=1e-2):
        raise RuntimeError(
            f"roe: the latents stored in the {attn.attn_backend.get_name()} paged cache do not read back through "
            "the plugin's view of its layout; RoE's clean cache cannot run on this backend"
        )


def hook(model, attn: nn.Module) -> None:
    """Clean rows through vLLM's MLA layer; the noisy rows attend to the clean latents plus their own."""
    original = attn.forward
    checked = []

    def forward(q, kv_c_normed, k_pe, output_shape=None, q_dcp_replicated=None):
        step = model._roe_step
        if step is None or q.shape[0] != step.n + step.extra:
            return original(q, kv_c_normed, k_pe, output_shape=output_shape, q_dcp_replicated=q_dcp_replicated)
        n = step.n
        shape = None if output_shape is None else torch.Size((n, *output_shape[1:]))
        clean = original(q[:n], kv_c_normed[:n], k_pe[:n], output_shape=shape, q_dcp_replicated=None)
        if not checked:
            check_layout(attn, step, kv_c_normed[:n], k_pe[:n])
            checked.append(True)
        noisy = noisy_attention(attn, step, q[n:], kv_c_normed[n:], k_pe[n:])
        return torch.cat([clean, noisy.to(clean.dtype)], dim=0)

    attn.forward = forward


def _block_table(meta) -> torch.Tensor:
    """[R, max blocks] in the batch's request order: vLLM's MLA metadata splits it, decodes first."""
    parts = [m.block_table for m in (meta.decode, meta.prefill) if m is not None]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def noisy_attention(attn: nn.Module, step, q, kv_c, k_pe) -> torch.Tensor:
    """q [E, H, nope + rope] (rope applied), kv_c [E, Lr], k_pe [E, 1, rope] -> [E, H * v_head_dim]."""
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata[attn.layer_name]
    bs, read = latent_view(attn, _cache(attn))
    H, P, Lr = attn.num_heads, attn.qk_nope_head_dim, attn.kv_lora_rank
    R, K1 = step.idx.numel(), step.k - 1
    W = Lr + attn.qk_rope_head_dim
    pos = step.pos.long()  # [R]: the history is positions 0 .. pos-1
    L = max(int(pos.max()), 1)
    j = torch.arange(L, device=q.device)
    table = _block_table(meta)[:R].long()
    blocks = table.gather(1, (j // bs)[None].expand(R, -1).clamp(max=table.shape[1] - 1))  # [R, L]
    ok = j[None] < pos[:, None]  # [R, L]
    # slots past a sequence's history (padding up to the longest) may hold anything: zero them
    hist = read(blocks, (j % bs)[None].expand(R, -1)).masked_fill(~ok[..., None], 0).to(q.dtype)  # [R, L, W]
    q_nope, q_pe = q.split([P, attn.qk_rope_head_dim], dim=-1)
    q_lat = torch.bmm(q_nope.transpose(0, 1), attn.W_UK_T.to(q.dtype)).transpose(0, 1)  # [E, H, Lr]
    qf = torch.cat([q_lat, q_pe], dim=-1).reshape(R, 1, K1 * H, W)  # [R, 1, (K-1)*H, W]
    own = torch.cat([kv_c, k_pe.reshape(R * K1, -1)], dim=-1).reshape(R, K1, W)  # [R, K-1, W]
    keys = torch.cat([hist, own.to(q.dtype)], dim=1)[:, None]  # [R, 1, L+K-1, W]: one latent row for all heads
    own_mask = torch.eye(K1, dtype=torch.bool, device=q.device).repeat_interleave(H, 0)  # [(K-1)*H, K-1]
    mask = torch.cat([ok[:, None, :].expand(R, K1 * H, -1), own_mask[None].expand(R, -1, -1)], dim=-1)[:, None]
    out = F.scaled_dot_product_attention(qf, keys, keys[..., :Lr], attn_mask=mask, scale=float(attn.scale))
    out = out.reshape(R * K1, H, Lr).transpose(0, 1)  # [H, E, Lr]
    return torch.bmm(out, attn.W_UV.to(q.dtype)).transpose(0, 1).reshape(R * K1, -1)  # [E, H * v_head_dim]
