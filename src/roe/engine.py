"""The batched K-sample forward: B prompts x K samples as one batch of B*K rows.

Row b*K + k is sample k of prompt b; sample 0 is always clean (tau = 0).

cache="clean" (the paper's Clean Cache): the prompt is prefilled once, on the
clean path, with B rows. Each later chunk runs B*K rows; a noisy row attends to
the *clean* keys/values of every earlier position plus its own key/value for
the current position, and only the clean rows' keys/values are stored. The
stored cache is the size of a K = 1 run whatever K is. The attention that does
this folds the K samples into the query-head dimension, so the clean history
is read once for all K queries and never copied K times.

cache="full": every sample is an independent noisy run of the whole sequence,
with its own rows in an ordinary transformers cache (K times the memory).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from .adapters import ACTIVE, RoutingNoise
from .routing import draw_token_noise

CLEAN_ATTENTION = "roe_clean"


@dataclass
class _CleanStep:
    k: int  # rows per prompt in this forward
    valid: torch.Tensor  # [B, T] bool: every position seen so far, this chunk included
    chunk: int  # S, the chunk length
    shared: dict = field(default_factory=dict)  # layer -> (keys, values) of the clean history + clean chunk
    masks: dict = field(default_factory=dict)  # (kv_len, window) -> [B, S, kv_len] bool


_CLEAN: ContextVar[_CleanStep | None] = ContextVar("roe_clean_step", default=None)


class CleanCache(DynamicCache):
    """A transformers cache that stores only the clean sample's keys/values.

    `update` receives the chunk for all B*K rows, appends the clean rows to the
    history and hands the attention the shared history; it returns the rows'
    own chunk keys/values, which the clean attention uses for the diagonal.
    """

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        step = _CLEAN.get()
        shared = super().update(key_states[:: step.k], value_states[:: step.k], layer_idx, *args, **kwargs)
        step.shared[layer_idx] = shared
        return key_states, value_states


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _allowed(step: _CleanStep, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[B, S, kv_len] bool: which shared keys each chunk query may see (strictly earlier, valid, in window)."""
    key = (kv_len, window)
    if key not in step.masks:
        T = step.valid.shape[1]
        S = step.chunk
        q = torch.arange(T - S, T, device=device)[:, None]  # absolute index of each query
        kv = torch.arange(T - kv_len, T, device=device)[None, :]  # absolute index of each shared key
        ok = kv < q
        if window is not None:
            ok = ok & (q - kv < window)
        step.masks[key] = ok[None] & step.valid[:, T - kv_len :].to(device)[:, None, :]
    return step.masks[key]


def clean_cache_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, s_aux=None, **kwargs
):
    """Attention for B*K rows over one shared clean history.

    query [B*K, Hq, S, D]; key/value: the rows' own chunk [B*K, Hkv, S, D].
    Returns [B*K, S, Hq, Dv] like every transformers attention function.
    """
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("RoE's clean-cache attention does not support attention logit soft-capping")
    step = _CLEAN.get()
    k = step.k
    shared_k, shared_v = step.shared[module.layer_idx]
    if hasattr(module, "expand_kv"):  # multi-head latent attention stores latents; expand them as the model does
        shared_k, shared_v = module.expand_kv(shared_k, shared_v)
    N, Hq, S, D = query.shape
    B, Hkv, T = N // k, key.shape[1], shared_k.shape[2]
    G = Hq // Hkv
    Dv = value.shape[-1]
    scaling = D**-0.5 if scaling is None else scaling

    q = query.view(B, k, Hkv, G, S, D).transpose(1, 2)  # [B, Hkv, K, G, S, D]
    scores = torch.matmul(q.reshape(B, Hkv, k * G * S, D), shared_k.transpose(2, 3))  # [B, Hkv, K*G*S, T]
    scores = scores.view(B, Hkv, k, G, S, T).float() * scaling
    allowed = _allowed(step, T, sliding_window, query.device)  # [B, S, T]
    scores = scores.masked_fill(~allowed[:, None, None, None], float("-inf"))

    own_k = key.view(B, k, Hkv, 1, S, D).transpose(1, 2)  # [B, Hkv, K, 1, S, D]
    own = (q * own_k).sum(-1, keepdim=True).float() * scaling  # [B, Hkv, K, G, S, 1]
    parts = [scores, own]
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sinks is not None:
        parts.append(sinks.float().view(1, Hkv, 1, G, 1, 1).expand(B, Hkv, k, G, S, 1))
    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1).to(value.dtype)

    out = torch.matmul(probs[..., :T].reshape(B, Hkv, k * G * S, T), shared_v)  # [B, Hkv, K*G*S, Dv]
    own_v = value.view(B, k, Hkv, 1, S, Dv).transpose(1, 2)  # [B, Hkv, K, 1, S, Dv]
    out = out.view(B, Hkv, k, G, S, Dv) + probs[..., T : T + 1] * own_v
    out = out.transpose(1, 2).reshape(N, Hq, S, Dv).transpose(1, 2)  # [B*K, S, Hq, Dv]
    return out.contiguous(), None


AttentionInterface.register(CLEAN_ATTENTION, clean_cache_attention)


def pad_batch(seqs: list[list[int]], width: int, pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids [B, width] and a bool mask of the real tokens, padded on the left or the right."""
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[b, span] = torch.tensor(s)
            mask[b, span] = True
    return ids, mask


def aggregate(logits: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the K samples. logits [B, K, ..., V] -> normalised log-probs [B, ..., V] (float32)."""
    logits = logits.float()
    k = logits.shape[1]
    if k == 1:
        return F.log_softmax(logits[:, 0], dim=-1)
    if how == "probs":  # log of the mean probability
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - torch.log(torch.tensor(float(k)))
    if how == "logits":
        return F.log_softmax(logits.mean(dim=1), dim=-1)
    if how == "logprobs":  # renormalised geometric mean of the probabilities
        return F.log_softmax(F.log_softmax(logits, dim=-1).mean(dim=1), dim=-1)
    raise ValueError(f"unknown aggregate {how!r}")


class RoEPass:
    """One batched RoE run over B sequences: `prefill` the history, then `forward` chunks.

    Noise for (prompt b, position p) is drawn from a generator seeded by
    (seeds[b], p), so a token gets the same noise whether it is generated or scored.
    """

    def __init__(self, model, taus: list[float], num_experts: list[int], num_samples: int, cache: str,
                 seeds: list[int], record_experts: bool = False):
        self.model = model
        self.taus = taus
        self.num_experts = num_experts
        self.k = num_samples
        self.clean = cache == "clean"
        self.seeds = seeds
        self.record = record_experts
        self.chosen: list[list[torch.Tensor | None]] = []  # per forward: per MoE layer [rows*S, top_k]
        self.device = next(model.parameters()).device
        B = len(seeds)
        self.cache = CleanCache(config=model.config) if self.clean else DynamicCache(config=model.config)
        self.valid = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=self.device)

    def kv_cache_bytes(self) -> int:
        return cache_bytes(self.cache)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Process history tokens without producing predictions: clean path only under clean cache."""
        if ids.shape[1]:
            self._run(ids, mask, 1 if self.clean else self.k, logits_to_keep=1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, S] -> logits [B, K, S, V] for the next token after each position."""
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        return self._run(ids, mask, self.k, logits_to_keep=0)

    def _noise(self, pos: torch.Tensor, k: int) -> RoutingNoise | None:
        noisy = [m for m, t in enumerate(self.taus) if t > 0]
        if k == 1 or not noisy:
            return None
        B, S = pos.shape
        g = draw_token_noise(self.seeds, pos.cpu(), k - 1, len(self.taus), max(self.num_experts))  # [B,S,K-1,L,E]
        g = g.permute(3, 0, 2, 1, 4)  # [L, B, K-1, S, E]
        per_layer: list[torch.Tensor | None] = [None] * len(self.taus)
        for m in noisy:
            e = self.num_experts[m]
            n = torch.zeros(B, k, S, e)
            n[:, 1:] = g[m, ..., :e] * self.taus[m]
            per_layer[m] = n.view(B * k * S, e).to(self.device)
        rows = torch.zeros(B, k, S, 1, dtype=torch.bool)
        rows[:, 1:] = True
        return RoutingNoise(per_layer, rows.view(B * k * S, 1).to(self.device), record=self.record)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, k: int, logits_to_keep: int) -> torch.Tensor:
        B, S = ids.shape
        ids, mask = ids.to(self.device), mask.to(self.device).bool()
        pos = (self.next_pos[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)  # [B, S]
        valid = torch.cat([self.valid, mask], dim=1)  # [B, T]
        noise = self._noise(pos, k)
        if noise is None and self.record:
            noise = RoutingNoise([None] * len(self.taus), torch.zeros(1, 1, dtype=torch.bool), record=True)
        kwargs = dict(
            input_ids=ids.repeat_interleave(k, 0),
            position_ids=pos.repeat_interleave(k, 0),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        config = self.model.config
        saved_attn = config._attn_implementation
        route_token = ACTIVE.set(noise)
        clean_token = _CLEAN.set(_CleanStep(k=k, valid=valid, chunk=S)) if self.clean else None
        try:
            if self.clean:
                config._attn_implementation = CLEAN_ATTENTION
            else:
                kwargs["attention_mask"] = valid.repeat_interleave(k, 0).long()
            with torch.inference_mode():
                logits = self.model(**kwargs).logits
        finally:
            config._attn_implementation = saved_attn
            ACTIVE.reset(route_token)
            if clean_token is not None:
                _CLEAN.reset(clean_token)
        if noise is not None and noise.chosen is not None:
            self.chosen.append(noise.chosen)
        self.valid = valid
        self.next_pos = self.next_pos + mask.long().sum(1)
        return logits.view(B, k, logits.shape[1], -1)
