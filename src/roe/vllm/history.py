"""Where each RoE token's clean history lies in a layer's paged KV cache, and which of it the token may see.

vLLM builds attention metadata per KV-cache group. For ordinary (full or sliding-window) layers the block
table has one row per sequence, in the order of the scheduled batch. A `ChunkedLocalAttention` layer (Llama 4)
gets *virtual batches* instead: each sequence's scheduled tokens are split at chunk boundaries, and each piece
gets the block-table row of its own chunk only (vllm.v1.attention.backends.utils.
make_local_attention_virtual_batches). A token then attends to the earlier positions of its own chunk, which is
what the noisy rows must see too.
"""

from __future__ import annotations

import torch
from torch import nn

from .settings import RoESettingsError


def chunk_size(attn: nn.Module) -> int | None:
    return getattr(attn, "attention_chunk_size", None) or None


def reference_layer(attns: list[nn.Module]) -> nn.Module:
    """An attention layer whose metadata lists the real sequences (not a chunked layer's virtual batches)."""
    for attn in attns:
        if chunk_size(attn) is None:
            return attn
    raise RoESettingsError("roe: every attention layer is chunked-local; the plugin needs one other layer to find the sequences")


def history_blocks(attn: nn.Module, meta, idx: torch.Tensor, pos: torch.Tensor, block_size: int):
    """(table [R, nb], base [R], first [R]): the block-table row holding each RoE token's history in this layer's
    metadata, the position its first entry holds, and the first position the token may attend to (idx: the
    token's row in the batch, pos: its position; R tokens)."""
    R = idx.numel()
    chunk = chunk_size(attn)
    if chunk is None:
        zero = torch.zeros_like(pos)
        return meta.block_table[:R].long(), zero, zero
    if chunk % block_size:
        raise RoESettingsError(f"roe: attention_chunk_size {chunk} is not a multiple of the KV block size {block_size}")
    # the RoE token (its sequence's last scheduled token) ends its sequence's last virtual batch
    ends = meta.query_start_loc[1:].to(idx.device).long()  # [virtual batches]
    batch = torch.searchsorted(ends, idx.long() + 1)  # [R]
    start = pos // chunk * chunk  # its chunk's first position: a multiple of block_size
    return meta.block_table.long()[batch], start, start
