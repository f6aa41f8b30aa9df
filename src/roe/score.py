"""Teacher-forced log-probs under RoE: continuation scores (multiple choice) and perplexity.

The semantics are the generation loop's: the context (but its last token) is
prefilled as history, then the last context token and the continuation are run
as the noisy steps, with the same seeds, so a continuation scores exactly the
log-prob that generating it token by token would give.

Memory. A forward over B items and S positions returns logits [B, K, S, V] in
the model's dtype, and `aggregate` works on float32 copies of them. Scoring
bounds that by a budget (`score_memory_bytes`, default 1 GiB): it picks the
items per batch and the positions per forward so that

    B * S * K * V * (logit bytes + 4 * FLOAT32_COPIES) <= budget,

and reduces each forward's logits to the scored tokens' log-probs before the
next one, so peak memory does not grow with K (or the text length) beyond the
budget. The floor is one item and one position per forward, K * V logits: a
budget below that still runs, at that floor. Scores do not depend on the
chunking (up to float rounding of the model's own matmuls over other shapes).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .engine import pad_batch

HEAD_ROWS = 8192  # vocabulary rows of a 16-bit output layer upcast at a time for float32 scoring logits
CHUNK = 64  # positions per forward at most: also bounds the model's activations when the vocabulary is small
SCORE_BATCH = 8  # items per batch at most
DEFAULT_SCORE_MEMORY = 1 << 30  # bytes of logits (and their float32 working copies) one forward may hold
FLOAT32_COPIES = 3  # float32 tensors of the logits' size alive at once in `aggregate` (upcast, log-softmax, a temporary)


def logit_width(model) -> tuple[int, int]:
    """(V, bytes per logit) of the model's output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    dtype = getattr(model, "dtype", torch.float32)
    if weight is not None:
        return int(weight.shape[0]), weight.element_size() if weight.is_floating_point() else dtype.itemsize
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size), dtype.itemsize


def position_bytes(num_samples: int, vocab: int, logit_bytes: int) -> int:
    """What one scored position of one item costs in a forward: K * V logits plus aggregate's float32 copies."""
    return num_samples * vocab * (logit_bytes + 4 * FLOAT32_COPIES)


def chunk_shape(num_samples: int, vocab: int, logit_bytes: int, budget: int | None,
                num_items: int = SCORE_BATCH) -> tuple[int, int]:
    """(items per batch, positions per forward) for scoring `num_items` items, keeping one forward's logits and
    aggregate's copies within `budget` bytes (None: no budget, SCORE_BATCH items x CHUNK positions).
    Never below one item and one position: that floor (K * V logits) runs even over the budget."""
    items = max(1, min(SCORE_BATCH, num_items))
    if budget is None:
        return items, CHUNK
    rows = max(1, budget // position_bytes(num_samples, vocab, logit_bytes))
    items = min(items, rows)
    return items, max(1, min(CHUNK, rows // items))


@contextlib.contextmanager
def float32_logits(model):
    """Scoring with a 16-bit model: its output layer's logits are computed and kept in float32 (the weights upcast
    HEAD_ROWS vocabulary rows at a time), not rounded to 16 bits. Rounding logits of size ~10 to bfloat16 moves
    each by up to ~0.03, and a log-likelihood by that per token; the model's own layers are unchanged.
    Generation keeps the model's own logits (its greedy tokens stay those of the model)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype.itemsize > 2:
        yield
        return

    def forward(x):  # x [..., D] -> [..., V] float32
        x = x.float()
        parts = [F.linear(x, head.weight[i : i + HEAD_ROWS].float(),
                          None if head.bias is None else head.bias[i : i + HEAD_ROWS].float())
                 for i in range(0, head.weight.shape[0], HEAD_ROWS)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    head.forward = forward  # an instance attribute: shadows the class's forward until removed
    try:
        yield
    finally:
        del head.forward


def check_budget(budget) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"score_memory_bytes must be an integer number of bytes or None, got {budget!r}")
    if budget < 1:
        raise ValueError(f"score_memory_bytes must be >= 1 (bytes) or None for no bound, got {budget}")
    return budget


def continuation_logprobs(roster, pairs: list[tuple[list[int], list[int]]], seeds: list[int],
                          positions: int = CHUNK) -> list[tuple[torch.Tensor, bool]]:
    """For one batch of (context_ids, continuation_ids): each continuation's per-token log-probs, and whether
    every continuation token is the argmax of the aggregated distribution (what greedy decoding would pick).
    `positions`: continuation positions per forward (see `chunk_shape`)."""
    pad = roster.pad_token_id
    history = [ctx[:-1] for ctx, _ in pairs]  # left-padded
    inputs = [[ctx[-1]] + cont[:-1] for ctx, cont in pairs]  # right-padded
    steps = max(len(x) for x in inputs)
    prefix, prefix_mask = pad_batch(history, max(len(h) for h in history), pad, left=True)
    chunk, chunk_mask = pad_batch(inputs, steps, pad, left=False)
    targets, _ = pad_batch([cont for _, cont in pairs], steps, 0, left=False)

    # scoring runs chunks eagerly (only decode steps compile): its own batch, its full length reserved at once
    run = roster.new_pass(seeds, capacity=prefix.shape[1] + steps, positions=min(positions, steps), compile=None)
    run.prefill(prefix, prefix_mask)
    picked, greedy = [], []
    for i in range(0, steps, positions):
        with float32_logits(roster.model):
            logits = run.forward(chunk[:, i : i + positions], chunk_mask[:, i : i + positions])  # [B, K, s, V]
        logp = run.combine(logits)  # [B, s, V] float32 (with adaptive K: the clean distribution where skipped)
        del logits
        target = targets[:, i : i + positions].to(logp.device)
        picked.append(logp.gather(-1, target[..., None])[..., 0].cpu())  # [B, s]
        greedy.append((logp.argmax(-1) == target).cpu())
        del logp
    picked, greedy = torch.cat(picked, dim=1), torch.cat(greedy, dim=1)
    return [(picked[b, : len(cont)], bool(greedy[b, : len(cont)].all())) for b, (_, cont) in enumerate(pairs)]
