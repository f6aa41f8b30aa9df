"""Teacher-forced log-probs under RoE: continuation scores (multiple choice) and perplexity.

The semantics are the generation loop's: the context (but its last token) is
prefilled as history, then the last context token and the continuation are run
as the noisy steps, with the same seeds, so a continuation scores exactly the
log-prob that generating it token by token would give.
"""

from __future__ import annotations

import torch

from .engine import aggregate, pad_batch

CHUNK = 64  # continuation tokens per forward: bounds the [B, K, S, V] logits


def continuation_logprobs(roster, pairs: list[tuple[list[int], list[int]]], seeds: list[int]) -> list[tuple[torch.Tensor, bool]]:
    """For one batch of (context_ids, continuation_ids): each continuation's per-token log-probs, and whether
    every continuation token is the argmax of the aggregated distribution (what greedy decoding would pick)."""
    pad = roster.pad_token_id
    history = [ctx[:-1] for ctx, _ in pairs]  # left-padded
    inputs = [[ctx[-1]] + cont[:-1] for ctx, cont in pairs]  # right-padded
    steps = max(len(x) for x in inputs)
    prefix, prefix_mask = pad_batch(history, max(len(h) for h in history), pad, left=True)
    chunk, chunk_mask = pad_batch(inputs, steps, pad, left=False)

    run = roster.new_pass(seeds)
    run.prefill(prefix, prefix_mask)
    pieces = []
    for i in range(0, steps, CHUNK):
        logits = run.forward(chunk[:, i : i + CHUNK], chunk_mask[:, i : i + CHUNK])  # [B, K, s, V]
        pieces.append(aggregate(logits, roster.config.aggregate).cpu())  # [B, s, V]
    logp = torch.cat(pieces, dim=1)
    out = []
    for b, (_, cont) in enumerate(pairs):
        target = torch.tensor(cont)
        rows = logp[b, : len(cont)]
        out.append((rows[torch.arange(len(cont)), target], bool((rows.argmax(-1) == target).all())))
    return out
