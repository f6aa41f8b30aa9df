"""Teacher-forced log-probs under RoE: continuation scores (multiple choice) and perplexity.

The semantics are the generation loop's: the context (but its last token) is
prefilled as history, then the last context token and the continuation are run
as the noisy steps, with the same seeds, so a continuation scores exactly the
log-prob that generating it token by token would give.
"""

from __future__ import annotations

import torch

from .engine import aggregate

CHUNK = 64  # continuation tokens per forward: bounds the [B, K, S, V] logits


def continuation_logprobs(roster, pairs: list[tuple[list[int], list[int]]], seeds: list[int]) -> list[tuple[torch.Tensor, bool]]:
    """For one batch of (context_ids, continuation_ids): each continuation's per-token log-probs, and whether
    every continuation token is the argmax of the aggregated distribution (what greedy decoding would pick)."""
    B = len(pairs)
    pad = roster.pad_token_id
    hist = max(len(c) for c, _ in pairs) - 1
    steps = max(len(x) for _, x in pairs)
    prefix = torch.full((B, hist), pad, dtype=torch.long)
    prefix_mask = torch.zeros(B, hist, dtype=torch.bool)
    chunk = torch.full((B, steps), pad, dtype=torch.long)
    chunk_mask = torch.zeros(B, steps, dtype=torch.bool)
    for b, (ctx, cont) in enumerate(pairs):
        if len(ctx) > 1:  # history left-padded, steps right-padded
            prefix[b, hist - len(ctx) + 1 :] = torch.tensor(ctx[:-1])
            prefix_mask[b, hist - len(ctx) + 1 :] = True
        inputs = [ctx[-1]] + cont[:-1]
        chunk[b, : len(inputs)] = torch.tensor(inputs)
        chunk_mask[b, : len(inputs)] = True

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
