"""Teacher-forced log-probs under RoE for `echo` (the prompt's tokens), with the generation loop's semantics
(as `roe.score`): position p of an item is scored given ids[:p] with the item's seed, so the numbers are those of
the distribution that would have picked each token."""

from ..engine import pad_batch

SCORE_ROWS = 8  # items per teacher-forced scoring forward
SCORE_BUDGET = 256 << 20  # bytes of logits (and aggregate's float32 copies) one scoring forward may hold

Scored = list[tuple[int, float, list[tuple[int, float]]]]  # per position: (token id, log-prob, top alternatives)


def vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def score_positions(roster, items: list[tuple[list[int], int, list[int] | None]], seeds: list[int],
                    top_n: int) -> list[Scored]:
    """Teacher-forced log-probs under RoE, with the generation loop's semantics (as `roe.score`).

    items: (ids, start, end): score ids[p] given ids[:p] for every p >= start, with that item's seed; `end` (a
    list of token ids or None) adds one more position after the last id, scoring the most likely of `end` there
    (the EOS that ended a completion). -> per item, per scored position: (token id, its log-prob, the top_n
    most likely (id, log-prob) pairs, best first).
    """
    out: list[Scored] = [[] for _ in items]
    todo = [i for i, (ids, start, end) in enumerate(items) if len(ids) > start or end]
    if not todo:
        return out
    per_position = roster.config.num_samples * vocab_size(roster.model) * 16  # float32 logits + aggregate's copies
    fit = max(1, SCORE_BUDGET // per_position)
    group_size = min(SCORE_ROWS, fit)
    for g in range(0, len(todo), group_size):
        group = todo[g : g + group_size]
        scored = _score_group(roster, [items[i] for i in group], [seeds[i] for i in group], top_n, fit)
        for i, table in zip(group, scored):
            out[i] = table
    return out


def _score_group(roster, items, seeds, top_n: int, fit: int) -> list[Scored]:
    """One batch of items: prefill what precedes each item's first scored position, then forward the rest in
    chunks of positions that keep the logits within the budget (`fit` positions)."""
    hist = [ids[: start - 1] for ids, start, _ in items]
    inputs = [ids[start - 1 :] if end else ids[start - 1 : -1] for ids, start, end in items]
    targets = [ids[start:] for ids, start, _ in items]
    steps = max(len(x) for x in inputs)
    pad = roster.pad_token_id
    prefix, prefix_mask = pad_batch(hist, max(len(h) for h in hist), pad, left=True)
    chunk, chunk_mask = pad_batch(inputs, steps, pad, left=False)
    run = roster.new_pass(seeds, capacity=prefix.shape[1] + steps, compile=None)  # eager chunks
    run.prefill(prefix, prefix_mask)
    width = max(1, min(64, fit // len(items)))
    out: list[Scored] = [[] for _ in items]
    for s0 in range(0, steps, width):
        logits = run.forward(chunk[:, s0 : s0 + width], chunk_mask[:, s0 : s0 + width])  # [B, K, s, V]
        logp = run.combine(logits)  # [B, s, V] float32 (adaptive K: the clean distribution where it skipped)
        del logits
        top = logp.topk(top_n, dim=-1) if top_n else None
        top_ids = top.indices.cpu().tolist() if top_n else None
        top_lps = top.values.cpu().tolist() if top_n else None
        for b, (_, _, end) in enumerate(items):
            for j in range(min(logp.shape[1], len(inputs[b]) - s0)):
                q = s0 + j
                # past the targets: the position after the completion, the EOS that ended it
                tok = targets[b][q] if q < len(targets[b]) else end[int(logp[b, j, end].argmax())]
                alts = list(zip(top_ids[b][j], top_lps[b][j])) if top_n else []
                out[b].append((tok, float(logp[b, j, tok]), alts))
        del logp
    return out
