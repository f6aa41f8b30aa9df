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

Shared leading layers (both caches): every decoder layer before the first noisy
MoE layer computes the same thing for the K samples of a prompt, so the forward
starts with B rows and each row is copied into its K samples at the entrance of
that layer; under the full cache those layers also store one history per prompt.
With no noisy layer at all (tau = 0) the K samples never separate.

A step is prepared on the host (positions, the step's noise in one tensor) and
sent to the device in one non-blocking copy, so a decode step never waits for the
device: the host can queue step t+1 while the device still runs step t.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from . import experts as expert_dispatch
from .adapters import ACTIVE, LAYER_INPUTS, RoutingNoise, find_moe_layers
from .routing import gumbel_noise

CLEAN_ATTENTION = "roe_clean"


@dataclass
class _Step:
    k: int  # samples per prompt
    fanout: int | None  # decoder layer from which a prompt has K rows (before it: one); None: never
    valid: torch.Tensor  # [B, T] bool: every position seen so far, this chunk included
    chunk: int  # S, the chunk length
    fold: bool = True  # read the clean history once for all K samples (False: K copies, for the benchmark)
    shared: dict = field(default_factory=dict)  # layer -> (keys, values) of the clean history + clean chunk
    masks: dict = field(default_factory=dict)  # (kind, kv_len, window) -> bool mask
    widened: dict = field(default_factory=dict)  # id(tensor) -> (tensor, tensor with each row copied K times)

    def rows_per_prompt(self, layer: int) -> int:
        return self.k if self.fanout is not None and layer >= self.fanout else 1

    def widen(self, layer: int, args, kwargs):
        """Layer pre-hook: from the fan-out layer on, give every batch-sized input K rows per prompt."""
        if self.fanout is None or layer < self.fanout:
            return None
        B = self.valid.shape[0]

        def grow(x):
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == B:
                seen = self.widened.get(id(x))  # position embeddings etc. are shared by every layer
                if seen is None or seen[0] is not x:  # (an id can be reused once its tensor is freed)
                    seen = self.widened[id(x)] = (x, x.repeat_interleave(self.k, 0))
                return seen[1]
            if isinstance(x, tuple):
                return tuple(grow(t) for t in x)
            return x

        return tuple(grow(a) for a in args), {n: grow(v) for n, v in kwargs.items()}


_CLEAN: ContextVar[_Step | None] = ContextVar("roe_clean_step", default=None)  # set under the clean cache


class CleanCache(DynamicCache):
    """A transformers cache that stores only the clean sample's keys/values.

    `update` receives the chunk for all rows of the layer, appends the clean rows
    to the history and hands the attention the shared history; it returns the rows'
    own chunk keys/values, which the clean attention uses for the diagonal.
    """

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        step = _CLEAN.get()
        k = step.rows_per_prompt(layer_idx)
        shared = super().update(key_states[::k], value_states[::k], layer_idx, *args, **kwargs)
        step.shared[layer_idx] = shared
        return key_states, value_states


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _allowed(step: _Step, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[B, S, kv_len] bool: which shared keys each chunk query may see (strictly earlier, valid, in window)."""
    key = ("history", kv_len, window)
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


def _fused_mask(step: _Step, k: int, groups: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """The mask for one fused attention call with the K*G queries of a prompt folded together.

    k == 1 (a prompt's single clean row, any chunk length): [B, 1, G*S, kv_len], the causal mask.
    k > 1 (one decode position): [B, 1, K*G, kv_len + K], the strictly earlier clean history, then
    each sample's own key, appended after the history.
    """
    key = ("fused", k, groups, kv_len, window)
    if key not in step.masks:
        B, S = step.valid.shape[0], step.chunk
        history = _allowed(step, kv_len, window, device)  # [B, S, kv_len]
        if k == 1:
            history = history.clone()
            history[:, :, kv_len - S :] |= torch.eye(S, dtype=torch.bool, device=device)
            mask = history.repeat(1, groups, 1)
        else:
            own = torch.eye(k, dtype=torch.bool, device=device).repeat_interleave(groups, 0)  # [K*G, K]
            mask = torch.cat([history.expand(B, k * groups, kv_len), own.expand(B, k * groups, k)], dim=-1)
        step.masks[key] = mask[:, None]
    return step.masks[key]


def clean_cache_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, s_aux=None, **kwargs
):
    """Attention for K rows per prompt over one shared clean history.

    query [B*K, Hq, S, D]; key/value: the rows' own chunk [B*K, Hkv, S, D].
    Returns [B*K, S, Hq, Dv] like every transformers attention function.
    """
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("RoE's clean-cache attention does not support attention logit soft-capping")
    step = _CLEAN.get()
    k = step.rows_per_prompt(module.layer_idx)
    shared_k, shared_v = step.shared[module.layer_idx]
    if hasattr(module, "expand_kv"):  # multi-head latent attention stores latents; expand them as the model does
        shared_k, shared_v = module.expand_kv(shared_k, shared_v)
    N, Hq, S, D = query.shape
    B, Hkv, T = N // k, key.shape[1], shared_k.shape[2]
    G = Hq // Hkv
    Dv = value.shape[-1]
    scaling = D**-0.5 if scaling is None else scaling
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)

    if sinks is None and k == 1:  # a prompt's single row: one fused kernel, the G query heads of a KV head folded
        q = query.reshape(B, Hkv, G * S, D)
        mask = _fused_mask(step, 1, G, T, sliding_window, query.device)
        out = F.scaled_dot_product_attention(q, shared_k, shared_v, attn_mask=mask, scale=scaling)
        return out.view(B, Hq, S, Dv).transpose(1, 2).contiguous(), None  # [B, S, Hq, Dv]
    if sinks is None and S == 1 and step.fold:  # decode: the K*G queries of a prompt folded, own keys appended
        q = query.view(B, k, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, k * G, D)
        keys = torch.cat([shared_k, key.view(B, k, Hkv, D).transpose(1, 2)], dim=2)  # [B, Hkv, T+K, D]
        values = torch.cat([shared_v, value.view(B, k, Hkv, Dv).transpose(1, 2)], dim=2)
        mask = _fused_mask(step, k, G, T, sliding_window, query.device)  # [B, 1, K*G, T+K]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)  # [B, Hkv, K*G, Dv]
        return out.view(B, Hkv, k, G, Dv).transpose(1, 2).reshape(N, 1, Hq, Dv), None
    if sinks is None and S == 1:  # unoptimised, for the benchmark's before/after row: K copies of the history
        keys = torch.cat([shared_k.repeat_interleave(k, 0), key], dim=2)  # [B*K, Hkv, T+1, D]
        values = torch.cat([shared_v.repeat_interleave(k, 0), value], dim=2)
        history = _allowed(step, T, sliding_window, query.device).repeat_interleave(k, 0)  # [B*K, 1, T]
        mask = torch.cat([history, history.new_ones(N, 1, 1)], dim=-1)[:, None]  # [B*K, 1, 1, T+1]
        out = F.scaled_dot_product_attention(query.view(N, Hkv, G, D), keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(N, 1, Hq, Dv), None

    q = query.view(B, k, Hkv, G, S, D).transpose(1, 2)  # [B, Hkv, K, G, S, D]
    scores = torch.matmul(q.reshape(B, Hkv, k * G * S, D), shared_k.transpose(2, 3))  # [B, Hkv, K*G*S, T]
    scores = scores.view(B, Hkv, k, G, S, T).float() * scaling
    allowed = _allowed(step, T, sliding_window, query.device)  # [B, S, T]
    scores = scores.masked_fill(~allowed[:, None, None, None], float("-inf"))

    own_k = key.view(B, k, Hkv, 1, S, D).transpose(1, 2)  # [B, Hkv, K, 1, S, D]
    own = (q * own_k).sum(-1, keepdim=True).float() * scaling  # [B, Hkv, K, G, S, 1]
    parts = [scores, own]
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
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(k)
    if how == "logits":
        return F.log_softmax(logits.mean(dim=1), dim=-1)
    if how == "logprobs":  # renormalised geometric mean of the probabilities
        return F.log_softmax(F.log_softmax(logits, dim=-1).mean(dim=1), dim=-1)
    raise ValueError(f"unknown aggregate {how!r}")


class RoEPass:
    """One batched RoE run over B sequences: `prefill` the history, then `forward` chunks.

    Noise for (prompt b, position p) is drawn from a generator seeded by
    (seeds[b], p), so a token gets the same noise whether it is generated or scored.

    share_layers, fold_samples and choose_dispatch switch off the engine's
    optimisations (shared leading layers; the clean history read once for all
    samples; expert dispatch chosen per layer shape, see experts.py) for the
    benchmark's before/after rows; results are the same either way, up to float
    rounding.
    """

    def __init__(self, model, taus: list[float], num_experts: list[int], num_samples: int, cache: str,
                 seeds: list[int], record_experts: bool = False, share_layers: bool = True,
                 fold_samples: bool = True, choose_dispatch: bool = True):
        self.model = model
        self.taus = taus
        self.num_experts = num_experts
        self.k = num_samples
        self.clean = cache == "clean"
        self.seeds = seeds
        self.record = record_experts
        self.fold = fold_samples
        self.choose_dispatch = choose_dispatch
        noisy = [layer for (layer, _), tau in zip(find_moe_layers(model), taus) if tau > 0]
        # the decoder layer where a prompt's K samples separate (None: they never do)
        self.fanout = (noisy[0] if noisy else None) if share_layers else 0
        self.chosen: list[list[torch.Tensor | None]] = []  # per forward: per MoE layer [rows*S, top_k]
        self.device = next(model.parameters()).device
        B = len(seeds)
        self.cache = CleanCache(config=model.config) if self.clean else DynamicCache(config=model.config)
        self.valid = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(B, dtype=torch.long)  # on the host: reading it never waits for the device
        self.noisy_rows: dict[tuple[int, int, int], torch.Tensor] = {}  # (B, K, S) -> [B*K*S, 1] on the device

    def kv_cache_bytes(self) -> int:
        return cache_bytes(self.cache)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Process history tokens without producing predictions: clean path only under clean cache."""
        if ids.shape[1]:
            self._run(ids, mask, 1 if self.clean else self.k, logits_to_keep=1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, S] -> logits [B, K, S, V] for the next token after each position."""
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.bool)
        return self._run(ids, mask, self.k, logits_to_keep=0)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor onto the model's device without waiting for the device (a plain copy would sync)."""
        if self.device.type == "cuda":  # pinned memory: the copy is queued, the host does not wait for it
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _noise(self, pos: torch.Tensor, k: int) -> RoutingNoise | None:
        """pos [B, S] on the host -> the step's scaled noise on the device, sample 0 of each prompt clean."""
        noisy = [m for m, t in enumerate(self.taus) if t > 0]
        if k == 1 or not noisy:
            return None
        B, S = pos.shape
        pos = self._to_device(pos)
        seeds = self._to_device(torch.tensor(self.seeds))[:, None, None]  # [B, 1, 1]
        sample = torch.arange(k, device=self.device)[None, :, None]  # [1, K, 1]
        per_layer: list[torch.Tensor | None] = [None] * len(self.taus)
        for m in noisy:
            g = gumbel_noise(seeds, pos[:, None, :], sample, m, self.num_experts[m])  # [B, K, S, E]
            per_layer[m] = (g * self.taus[m]).reshape(B * k * S, self.num_experts[m])
        if (B, k, S) not in self.noisy_rows:
            rows = torch.ones(B, k, S, 1, dtype=torch.bool)
            rows[:, 0] = False
            self.noisy_rows[B, k, S] = rows.view(B * k * S, 1).to(self.device)
        return RoutingNoise(per_layer, self.noisy_rows[B, k, S], record=self.record)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, k: int, logits_to_keep: int) -> torch.Tensor:
        B, S = ids.shape
        host_mask = mask.bool().cpu()  # the caller's mask, normally on the host already
        pos = (self.next_pos[:, None] + host_mask.long().cumsum(1) - 1).clamp(min=0)  # [B, S]
        valid = torch.cat([self.valid, self._to_device(host_mask)], dim=1)  # [B, T]
        noise = self._noise(pos, k)
        if noise is None and self.record:
            noise = RoutingNoise([None] * len(self.taus), torch.zeros(1, 1, dtype=torch.bool), record=True)
        # every forward enters with one row per prompt; each is copied into its K samples at the fan-out layer
        fanout = self.fanout if k > 1 else None
        kwargs = dict(
            input_ids=ids if ids.device == self.device else self._to_device(ids.cpu()),
            position_ids=self._to_device(pos),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        config = self.model.config
        saved_attn = config._attn_implementation
        saved_experts = getattr(config, "_experts_implementation", None)
        route_token = ACTIVE.set(noise)
        step = _Step(k=k, fanout=fanout, valid=valid, chunk=S, fold=self.fold)
        clean_token = _CLEAN.set(step) if self.clean else None
        widen_token = LAYER_INPUTS.set(step.widen if fanout is not None else None)
        try:
            if self.choose_dispatch and saved_experts == "grouped_mm":  # transformers' default; a user's choice stays
                config._experts_implementation = expert_dispatch.AUTO
            if self.clean:
                config._attn_implementation = CLEAN_ATTENTION
            else:  # the model's own attention; its mask is built for B rows and widened at the fan-out
                kwargs["attention_mask"] = valid.long()
            with torch.inference_mode():
                logits = self.model(**kwargs).logits
        finally:
            config._attn_implementation = saved_attn
            if saved_experts is not None:
                config._experts_implementation = saved_experts
            LAYER_INPUTS.reset(widen_token)
            ACTIVE.reset(route_token)
            if clean_token is not None:
                _CLEAN.reset(clean_token)
        if noise is not None and noise.chosen is not None:
            self.chosen.append(noise.chosen)
        self.valid = valid
        self.next_pos = self.next_pos + host_mask.long().sum(1)
        logits = logits.view(B, -1, logits.shape[1], logits.shape[2])  # [B, K or 1, S, V]
        return logits.expand(B, k, *logits.shape[2:])  # no noisy layer: the K samples are one computation
