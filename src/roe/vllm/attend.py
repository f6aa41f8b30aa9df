"""The noisy rows' attention over [clean history from the paged cache ; own key/value], with the attention
features of the layer (attention sinks), as vLLM's kernel computes them for the clean rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q, k, v, mask, scale: float, sinks: torch.Tensor | None, groups: int):
    """q [R, Hkv, K1*G, D] (row k1*G + g is query head hkv*G + g of noisy sample k1), k/v [R, Hkv, T, D], mask
    [R, 1, K1*G, T] (True: visible) -> [R, Hkv, K1*G, Dv].

    Sinks (GPT-OSS): one learned logit per query head joins each softmax's denominator and attends to nothing,
    so the weights over the real keys sum to less than one; computed in float32 as the engine does."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    R, Hkv, rows, _ = q.shape
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [R, Hkv, K1*G, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(Hkv, 1, groups).expand(Hkv, rows // groups, groups).reshape(1, Hkv, rows, 1)
    probs = torch.softmax(torch.cat([scores, sink.expand(R, -1, -1, -1)], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
