"""DeepSeek Sparse Attention (DSA: DeepSeek-V3.2, GLM-5) under the clean cache.

A DSA layer's indexer scores the keys a query may see with its own small query/key projections and keeps the
`index_topk` best; the attention then reads only those. Under the clean cache a noisy sample's query at a
position sees the clean history plus its own key (engine.py), so its indexer must choose among the same keys:
the clean history's indexer keys plus its own. The indexer keys are a second per-layer cached state, stored
for the clean rows only, like the keys and values (`CleanCache.update_indexer`).

Every row (clean or noisy) scores the layout [the clean history's kv_len slots | the chunk's own S keys]:
history slot t is visible to chunk position s when it is valid and strictly earlier, and of the own keys only
its own. A clean row's own key equals the clean key at its slot, which its history mask hides, so it ranks the
same keys as the model's own causal indexer, in the same order. The chosen indices (in that layout) reach the
clean attention as its `indices` argument, where `selection` turns them into masks. Layers that reuse the
previous layer's choice (GLM-5's "shared" layers) get the same layout, because every layer of a forward has
the same history length and chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ThreadSlot

# (decoder-layer index) -> the indexer's mask [B*K, 1, S, kv_len + S] bool; set by the engine during a clean forward
INDEXER_MASK = ThreadSlot()


def _attention_pre_hook(module: nn.Module, args, kwargs):
    mask = INDEXER_MASK.get()
    if mask is None:
        return None
    # the model hands the indexer attention_mask[:, 0]; under the clean cache it builds none (the clean attention
    # makes its own), so the indexer's is given here
    return args, {**kwargs, "attention_mask": mask(module.layer_idx)}


def install(layers) -> list:
    """Pre-hooks on the attention of every decoder layer that runs an indexer; returns their handles."""
    hooks = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if getattr(attn, "indexer", None) is not None:
            hooks.append(attn.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True))
    return hooks


def keys_mask(history: torch.Tensor, k: int) -> torch.Tensor:
    """history [B, S, kv_len] bool (the strictly earlier valid slots) -> the indexer's mask [B*K, 1, S, kv_len + S]:
    each of the K rows of a prompt sees that history and its own key."""
    B, S, kv_len = history.shape
    own = torch.eye(S, dtype=torch.bool, device=history.device).expand(B, S, S)
    return torch.cat([history, own], dim=-1).repeat_interleave(k, 0)[:, None]


def selection(indices: torch.Tensor, k: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [B*K, S, topk] in the [history | own] layout -> (history [B, K, S, kv_len], own [B, K, S]) bool:
    which history slots, and whether its own key, each query may read."""
    N, S, _ = indices.shape
    picked = torch.zeros(N, S, kv_len + S, dtype=torch.bool, device=indices.device)
    picked.scatter_(-1, indices.long(), True)
    own = picked[..., kv_len:].diagonal(dim1=-2, dim2=-1)  # [N, S]: query s's own key is column kv_len + s
    return picked[..., :kv_len].reshape(N // k, k, S, kv_len), own.reshape(N // k, k, S)
