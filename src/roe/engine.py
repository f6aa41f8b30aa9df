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

The decode step is static (gpt-fast style): the clean cache is preallocated
([B, H, capacity, D] per layer, written at a slot index held on the device), the
positions, the valid-slot mask and the next slot live on the device and are
advanced in place, and the routing noise is a pure function of (seed, position,
sample, layer, expert) computed inside the step (routing.gumbel_noise). Nothing
in a step reads a device value back to the host, so the step compiles as one
graph (torch.compile fullgraph) and, on CUDA, replays as CUDA graphs.

Adaptive K (RoEConfig.adaptive_metric, clean cache only): whether a token's K-1
noisy samples take effect is decided from the clean distribution its input token
was drawn from (the previous position's clean prediction), which is known when
the step starts and kept on the device (`gate`, [B] bool). The clean row's
distribution for the token being predicted is only known after the forward,
while routing happens inside it; deciding from the previous one keeps the step
one forward, one graph, no read-back. A skipped token's noisy rows keep the
model's own routing (their noisy choice is not written), so they visit exactly
the clean row's experts and compute the clean row's output (clean cache: same
history, same input): grouped_mm then reads no expert the clean rows do not
(the dense CPU path reads every expert whatever the rows choose), and the
aggregate is set to the clean distribution exactly. Under the clean cache a
noisy row at a position depends on nothing but the clean history and its own
noise, so a non-skipped position's aggregate is exactly fixed-K RoE's: scoring
runs the chunk at fixed K and applies the same per-position rule afterwards
(`combine`), so it equals decoding token by token. A two-pass step (clean first,
then the noisy rows where needed) would read the experts' weights twice.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from . import experts as expert_dispatch
from . import indexer as sparse_index
from .adapters import ACTIVE, LAYER_INPUTS, ThreadSlot, attention_owners, cache_argument, find_moe_layers, text_config
from .routing import gumbel_noise
from .state import (RecurrentStates, check_clean_support, has_recurrent_state, own_cache_class, state_bytes,
                    steps_one_position_at_a_time)

CLEAN_ATTENTION = "roe_clean"
CAPACITY_STEP = 128  # cache capacities are multiples of this, so one compiled step serves many prompt lengths
# a compiled step has one graph (and, on CUDA, one set of CUDA graphs) per shape: its passes round the batch up
# to a power of two and the capacity to CAPACITY_STEP times a power of two, so a server or an evaluation with
# varied batches and lengths compiles a handful of shapes, not one per request mix
COMPILED_SHAPES = 64  # graphs torch.compile may keep for the step (its default of 8 is a hard error with fullgraph)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@dataclass(eq=False)
class _Step:
    """What the router hooks, the layer pre-hooks, the cache and the attention read during one forward.

    B prompts x K samples x S chunk positions; at a noisy layer, row b*K*S + k*S + s is sample k of
    prompt b at chunk position s.
    """

    k: int  # samples per prompt in this forward
    fanout: int | None  # decoder layer from which a prompt has K rows (before it: one); None: never
    noisy: frozenset  # MoE layers that perturb their routing in this forward
    taus: torch.Tensor  # [L] float32: the tau of every MoE layer (values, so a new tau compiles nothing)
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B, S] int64: absolute position of each chunk token
    slots: torch.Tensor  # [S] int64: the cache slots this chunk writes (the same for every prompt)
    valid: torch.Tensor  # [B, kv_len] bool: slots that hold real tokens, this chunk's included
    windows: tuple  # per cache layer: its sliding window, or None
    cache: CleanCache | None = None
    chunks: tuple = ()  # per cache layer: its attention chunk (a query sees its own chunk only), or None
    owners: dict = field(default_factory=dict)  # cache layer -> decoder layer, where they differ (LongCat-Flash)
    fold: bool = True  # read the clean history once for all K samples (False: K copies, for the benchmark)
    chosen: list | None = None  # per MoE layer [rows, top_k], when recording (eager only)
    memo: dict = field(default_factory=dict)  # eager only: masks and widened inputs that every layer shares
    gate: torch.Tensor | None = None  # [B] bool, adaptive K, one-position steps: where the noisy rows take effect

    def remember(self, key, make):
        """make() once per forward in eager mode; under torch.compile the graph shares the computation itself."""
        if _compiling():
            return make()
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def rows_per_prompt(self, layer: int) -> int:
        return self.k if self.fanout is not None and layer >= self.fanout else 1

    def cache_rows_per_prompt(self, cache_layer: int) -> int:
        """rows_per_prompt of the decoder layer that holds this cache layer."""
        return self.rows_per_prompt(self.owners.get(cache_layer, cache_layer))

    @property
    def noisy_rows(self) -> torch.Tensor:
        """[B*K*S, 1] bool: True on the rows of noisy samples."""
        def make():
            B, S = self.positions.shape
            sample = torch.arange(self.k, device=self.positions.device) > 0
            rows = sample[None, :, None].expand(B, self.k, S)
            if self.gate is not None:  # adaptive K: a skipped prompt's noisy rows keep the clean routing
                rows = rows & self.gate[:, None, None]
            return rows.reshape(-1, 1)
        return self.remember("noisy_rows", make)

    def noise_for(self, layer: int, num_experts: int) -> torch.Tensor:
        """The tau-scaled Gumbel noise of MoE layer `layer` for every row: [B*K*S, E] (clean rows ignore theirs).

        Drawn for every noisy layer at once, when the first one asks (one chain of integer ops, not one per layer).
        """
        def make():
            B, S = self.positions.shape
            device = self.positions.device
            layers = sorted(self.noisy)
            sample = torch.arange(self.k, device=device)[None, :, None]  # [1, K, 1]
            ids = torch.tensor(layers, device=device)[:, None, None, None]  # [Ln, 1, 1, 1]
            g = gumbel_noise(self.seeds[:, None, None], self.positions[:, None, :], sample, ids, num_experts)
            g = g * self.taus[ids][..., None]  # [Ln, B, K, S, E]
            return {m: g[i].reshape(B * self.k * S, num_experts) for i, m in enumerate(layers)}
        return self.remember(("noise", num_experts), make)[layer]

    def widen(self, layer: int, args, kwargs):
        """Layer pre-hook: from the fan-out layer on, give every batch-sized input K rows per prompt."""
        if self.fanout is None or layer < self.fanout:
            return None
        B = self.valid.shape[0]

        def grow(x):
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == B:
                if _compiling():
                    return x.repeat_interleave(self.k, 0)
                seen = self.memo.get(("widen", id(x)))  # position embeddings etc. are shared by every layer
                if seen is None or seen[0] is not x:  # (an id can be reused once its tensor is freed)
                    seen = self.memo[("widen", id(x))] = (x, x.repeat_interleave(self.k, 0))
                return seen[1]
            if isinstance(x, tuple):
                return tuple(grow(t) for t in x)
            return x

        return tuple(grow(a) for a in args), {n: grow(v) for n, v in kwargs.items()}

    def indexer_mask(self, layer: int) -> torch.Tensor:
        """The mask a sparse-attention indexer scores its keys with (indexer.py): [rows, 1, S, kv_len + S]."""
        k = self.rows_per_prompt(layer)
        return self.remember(("indexer", k), lambda: sparse_index.keys_mask(_allowed(self, None), k))


_CLEAN = ThreadSlot()  # the _Step of the clean-cache forward running on this thread


class CleanCache(RecurrentStates):
    """The clean sample's keys/values, preallocated per layer as [B, H, capacity, D].

    The attention modules call `update` with the chunk of every row of their layer; the clean rows are
    written at the step's slots (one per chunk position, the same for every prompt: left padding is masked
    by the valid-slot mask) and the rows' own chunk keys/values are handed back, which the clean attention
    uses for the diagonal. Recurrent and convolution states (hybrid models) are kept by RecurrentStates
    (state.py) by the same rule: clean rows stored, noisy rows read the clean state. Not a transformers StaticCache: that one stores every row it is given, and the
    way it learns its write position (`cache_position`) differs across transformers 5.x releases.
    """

    is_compileable = True

    def __init__(self, capacity: int, static_addresses: bool):
        self.capacity = capacity
        self.length = 0  # slots written so far (host-side bookkeeping; the step itself reads `slots`)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.indexer_keys: dict[int, torch.Tensor] = {}  # sparse-attention indexers' keys [B, capacity, D]
        self.static_addresses = static_addresses  # CUDA graphs: buffers keep their address across replays
        self._init_states()

    def _rows_per_prompt(self, layer: int) -> int:
        return _CLEAN.get().rows_per_prompt(layer)

    @property
    def empty(self) -> bool:
        return not self.keys and not self.live

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        buf = like.new_zeros(like.shape[0], *like.shape[1:-2], self.capacity, like.shape[-1])
        if self.static_addresses:
            torch._dynamo.mark_static_address(buf)
        return buf

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        step = _CLEAN.get()
        k = step.cache_rows_per_prompt(layer_idx)
        if layer_idx not in self.keys:
            self.keys[layer_idx] = self._buffer(key_states[::k])
            self.values[layer_idx] = self._buffer(value_states[::k])
        self.keys[layer_idx].index_copy_(2, step.slots, key_states[::k])
        self.values[layer_idx].index_copy_(2, step.slots, value_states[::k])
        return key_states, value_states

    def update_indexer(self, key_states, layer_idx, *args, **kwargs):
        """A sparse-attention indexer's keys [rows, S, D]: the clean rows' are stored at the step's slots; returns
        [rows, kv_len + S, D], the clean history's keys then the rows' own (the layout of indexer.py)."""
        step = _CLEAN.get()
        k = step.rows_per_prompt(layer_idx)
        if layer_idx not in self.indexer_keys:
            self.indexer_keys[layer_idx] = self._buffer(key_states[::k])  # [B, capacity, D]
        self.indexer_keys[layer_idx].index_copy_(1, step.slots, key_states[::k])
        history = self.indexer_keys[layer_idx][:, : step.valid.shape[1]]
        return torch.cat([history.repeat_interleave(k, 0), key_states], dim=1)

    def history(self, layer_idx: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer_idx][:, :, :kv_len], self.values[layer_idx][:, :, :kv_len]

    def grow(self, capacity: int) -> None:
        for store in (self.keys, self.values, self.indexer_keys):
            for i, old in store.items():
                new = old.new_zeros(*old.shape[:-2], capacity, old.shape[-1])
                new[..., : self.capacity, :] = old
                if self.static_addresses:
                    torch._dynamo.mark_static_address(new)
                store[i] = new
        self.capacity = capacity

    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        if _compiling():  # the slots written before this step, from the device (Llama 4's attention temperature
            return _CLEAN.get().slots[0]  # reads it): a host integer would be baked into the graph
        return self.length

    def stored_bytes(self) -> int:
        """Bytes of the slots written so far (the buffers hold `capacity` slots)."""
        return sum(t[..., : self.length, :].numel() * t.element_size() for s in (self.keys, self.values, self.indexer_keys)
                   for t in s.values()) + self.state_bytes()


_CLEAN_CLASSES: dict[type, type] = {}


def clean_cache(own: type | None, capacity: int, static_addresses: bool) -> CleanCache:
    """A CleanCache; for a model that refuses any cache but its own class (MiniMax), one that is also of that
    class (the clean cache's methods come first; transformers' mask helpers see no layers of it)."""
    if own is None:
        return CleanCache(capacity, static_addresses)
    if own not in _CLEAN_CLASSES:
        _CLEAN_CLASSES[own] = type(f"Clean{own.__name__}", (CleanCache, own), {})
    cache = _CLEAN_CLASSES[own](capacity, static_addresses)
    cache.layers = []
    return cache


def cache_bytes(cache) -> int:
    if isinstance(cache, CleanCache):
        return cache.stored_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total + state_bytes(cache)


def sliding_windows(config) -> tuple:
    """Each decoder layer's sliding window (None: full attention), read from the config.

    Some models pass their window to the attention function (Mixtral, GPT-OSS); others apply it only
    through the mask they build (Qwen2-MoE's `layer_types`), which the clean cache does not use.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE stores 0 when it is switched off
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return (None,) * n
    types = getattr(config, "layer_types", None)
    if types is None:
        return (window,) * n
    return tuple(window if t == "sliding_attention" else None for t in types)


def attention_chunks(config) -> tuple:
    """Each cache layer's attention chunk (None: none), read from the config: chunked local attention (Llama 4)
    splits the sequence into chunks of `attention_chunk_size` positions and a query sees only the keys of its own
    chunk. Layers typed "chunked_attention" have it; with no layer types every layer does (as in transformers'
    masks, where a sliding window takes precedence)."""
    n = config.num_hidden_layers
    chunk = getattr(config, "attention_chunk_size", None) or None
    if chunk is None:
        return (None,) * n
    types = getattr(config, "layer_types", None)
    if types is None:
        return (None if getattr(config, "sliding_window", None) else chunk,) * n
    return tuple(chunk if t == "chunked_attention" else None for t in types)


def _allowed(step: _Step, window: int | None, chunk: int | None = None) -> torch.Tensor:
    """[B, S, kv_len] bool: which cached keys each chunk query may see (strictly earlier, valid, in window,
    in the query's attention chunk)."""
    def make():
        kv_len = step.valid.shape[1]
        q = step.slots[:, None]  # [S, 1] slot of each query
        kv = torch.arange(kv_len, device=q.device)[None, :]  # [1, kv_len]
        ok = kv < q
        if window is not None:
            ok = ok & (q - kv < window)
        ok = ok[None] & step.valid[:, None, :]  # [B, S, kv_len]
        if chunk is not None:  # chunks count positions (padding not counted), as the model's own mask does
            kv_pos = step.valid.long().cumsum(-1) - 1  # [B, kv_len] position of each valid slot
            start = torch.div(step.positions, chunk, rounding_mode="floor") * chunk  # [B, S] its chunk's start
            ok = ok & (kv_pos[:, None, :] >= start[:, :, None])
        return ok
    return step.remember(("history", window, chunk), make)


def _fused_mask(step: _Step, k: int, groups: int, window: int | None, chunk: int | None = None) -> torch.Tensor:
    """The mask for one fused attention call with the K*G queries of a prompt folded together.

    k == 1 (a prompt's single clean row, any chunk length): [B, 1, G*S, kv_len], the causal mask (the
    row's own key is the clean key in the cache, at its own slot).
    k > 1 (one decode position): [B, 1, K*G, kv_len + K], the strictly earlier clean history, then
    each sample's own key, appended after the history.
    """
    def make():
        B, kv_len = step.valid.shape
        history = _allowed(step, window, chunk)  # [B, S, kv_len]
        if k == 1:
            own = step.slots[:, None] == torch.arange(kv_len, device=history.device)[None, :]  # [S, kv_len]
            mask = (history | own[None]).repeat(1, groups, 1)
        else:
            own = torch.eye(k, dtype=torch.bool, device=history.device).repeat_interleave(groups, 0)  # [K*G, K]
            mask = torch.cat([history.expand(B, k * groups, kv_len), own.expand(B, k * groups, k)], dim=-1)
        return mask[:, None]
    return step.remember(("fused", k, groups, window, chunk), make)


def _selected_mask(step: _Step, picked, groups: int, window: int | None) -> torch.Tensor:
    """The k == 1 fused mask [B, 1, G*S, kv_len] restricted to the keys a sparse-attention indexer chose
    (picked: indexer.selection's history [B, 1, S, kv_len] and own [B, 1, S])."""
    history = _allowed(step, window) & picked[0][:, 0]  # [B, S, kv_len]
    own = step.slots[:, None] == torch.arange(history.shape[-1], device=history.device)[None, :]  # [S, kv_len]
    mask = history | (own[None] & picked[1][:, 0, :, None])
    return mask.repeat(1, groups, 1)[:, None]


def clean_cache_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, s_aux=None,
    indices=None, **kwargs
):
    """Attention for K rows per prompt over one shared clean history.

    query [B*K, Hq, S, D]; key/value: the rows' own chunk [B*K, Hkv, S, D]; indices [B*K, S, topk]: the keys a
    sparse-attention indexer chose, in indexer.py's [history | own] layout (None: every key).
    Returns [B*K, S, Hq, Dv] like every transformers attention function.
    """
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("RoE's clean-cache attention does not support attention logit soft-capping")
    if getattr(module, "is_kv_shared_layer", False):  # Gemma 4's num_kv_shared_layers: no cache of its own
        raise NotImplementedError("RoE's clean cache does not hold layers that reuse another layer's keys/values "
                                  "(num_kv_shared_layers > 0): use cache='full'")
    if indices is None and hasattr(module, "indexer"):  # a sparse-attention layer whose choice did not reach here
        raise NotImplementedError("RoE's clean-cache attention got no sparse-attention indices from this model")
    step = _CLEAN.get()
    layer = module.layer_idx
    k = step.cache_rows_per_prompt(layer)
    window = sliding_window if sliding_window is not None else step.windows[layer]
    chunk = step.chunks[layer] if step.chunks else None
    shared_k, shared_v = step.cache.history(layer, step.valid.shape[1])
    if hasattr(module, "expand_kv"):  # multi-head latent attention stores latents; expand them as the model does
        shared_k, shared_v = module.expand_kv(shared_k, shared_v)
    tile = key.shape[1] // shared_k.shape[1]
    if tile > 1:
        # the model repeated its key/value heads before the call, tiled (JetMoE's mixture of attention heads:
        # key.repeat(1, top_k, 1, 1), query head j*Hkv + h reads key head h); the history keeps Hkv heads. The
        # query heads are put in grouped order (h*top_k + j reads key head h), and the output back in the model's.
        N, Hq, S, D = query.shape
        Hkv = shared_k.shape[1]
        grouped = query.view(N, tile, Hkv, S, D).transpose(1, 2).reshape(N, Hq, S, D)
        out, _ = clean_cache_attention(module, grouped, key[:, :Hkv], value[:, :Hkv], attention_mask, scaling,
                                       dropout, sliding_window, s_aux, **kwargs)  # [N, S, Hq, Dv]
        Dv = out.shape[-1]
        return out.view(N, S, Hkv, tile, Dv).transpose(2, 3).reshape(N, S, Hq, Dv).contiguous(), None
    N, Hq, S, D = query.shape
    B, Hkv, T = N // k, key.shape[1], shared_k.shape[2]
    G = Hq // Hkv
    Dv = value.shape[-1]
    scaling = D**-0.5 if scaling is None else scaling
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    picked = None if indices is None else sparse_index.selection(indices, k, T)

    if sinks is None and k == 1:  # a prompt's single row: one fused kernel, the G query heads of a KV head folded
        q = query.reshape(B, Hkv, G * S, D)
        mask = _fused_mask(step, 1, G, window, chunk) if picked is None else _selected_mask(step, picked, G, window)
        out = F.scaled_dot_product_attention(q, shared_k, shared_v, attn_mask=mask, scale=scaling)
        return out.view(B, Hq, S, Dv).transpose(1, 2).contiguous(), None  # [B, S, Hq, Dv]
    if sinks is None and S == 1 and step.fold and not _compiling() and picked is None:
        # eager decode: the K*G queries of a prompt folded into one SDPA call, own keys appended (fastest on
        # a CPU); the compiled step takes the general path below, which never copies the history
        q = query.view(B, k, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, k * G, D)
        keys = torch.cat([shared_k, key.view(B, k, Hkv, D).transpose(1, 2)], dim=2)  # [B, Hkv, T+K, D]
        values = torch.cat([shared_v, value.view(B, k, Hkv, Dv).transpose(1, 2)], dim=2)
        mask = _fused_mask(step, k, G, window, chunk)  # [B, 1, K*G, T+K]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)  # [B, Hkv, K*G, Dv]
        return out.view(B, Hkv, k, G, Dv).transpose(1, 2).reshape(N, 1, Hq, Dv), None
    if sinks is None and S == 1 and not step.fold and picked is None:  # unoptimised: the benchmark's before row
        keys = torch.cat([shared_k.repeat_interleave(k, 0), key], dim=2)  # [B*K, Hkv, T+1, D]
        values = torch.cat([shared_v.repeat_interleave(k, 0), value], dim=2)
        history = _allowed(step, window, chunk).repeat_interleave(k, 0)  # [B*K, 1, T]
        mask = torch.cat([history, history.new_ones(N, 1, 1)], dim=-1)[:, None]  # [B*K, 1, 1, T+1]
        out = F.scaled_dot_product_attention(query.view(N, Hkv, G, D), keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(N, 1, Hq, Dv), None

    q = query.view(B, k, Hkv, G, S, D).transpose(1, 2)  # [B, Hkv, K, G, S, D]
    scores = torch.matmul(q.reshape(B, Hkv, k * G * S, D), shared_k.transpose(2, 3))  # [B, Hkv, K*G*S, T]
    scores = scores.view(B, Hkv, k, G, S, T).float() * scaling
    allowed = _allowed(step, window, chunk)[:, None]  # [B, 1, S, T]
    if picked is not None:
        allowed = allowed & picked[0]  # [B, K, S, T]
    scores = scores.masked_fill(~allowed[:, None, :, None], float("-inf"))

    own_k = key.view(B, k, Hkv, 1, S, D).transpose(1, 2)  # [B, Hkv, K, 1, S, D]
    own = (q * own_k).sum(-1, keepdim=True).float() * scaling  # [B, Hkv, K, G, S, 1]
    if picked is not None:
        own = own.masked_fill(~picked[1][:, None, :, None, :, None], float("-inf"))
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


def uncertain(logits: torch.Tensor, metric: str, threshold: float) -> torch.Tensor:
    """Adaptive K's rule: clean logits [..., V] -> [...] bool, True where the clean prediction is uncertain enough
    that the next token's noisy samples take effect (entropy in nats above, or top-2 probability margin below,
    the threshold)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if metric == "entropy":
        return torch.special.entr(probs).sum(-1) > threshold  # entr: 0 where a probability is 0 (no 0 * -inf)
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1] < threshold


def aggregate_gated(logits: torch.Tensor, how: str, gate: torch.Tensor | None) -> torch.Tensor:
    """`aggregate`, with the clean row's distribution itself where gate [B, ...] is False (adaptive K skipped the
    position: its noisy rows are the clean row, up to the rounding of batched arithmetic)."""
    out = aggregate(logits, how)
    if gate is None or logits.shape[1] == 1:
        return out
    return torch.where(gate[..., None], out, F.log_softmax(logits[:, 0].float(), dim=-1))


class RoEPass:
    """One batched RoE run over B sequences: `prefill` the history, then `decode` tokens or `forward` chunks.

    The noise of (prompt b, position p, sample k, MoE layer m) is routing.gumbel_noise(seeds[b], p, k, m),
    so a token gets the same noise whether it is generated or scored, alone or batched.

    capacity: cache slots to preallocate (prompt width + new tokens; rounded up to CAPACITY_STEP); a longer
    run grows the buffers. compile: None (eager), or a torch.compile backend ("inductor"; "eager" only
    traces; or a backend callable) for the decode step of the clean cache; inductor on CUDA replays it as
    CUDA graphs. The full cache and expert recording always run eagerly.
    share_layers, fold_samples and choose_dispatch switch off the engine's optimisations (shared leading
    layers; the clean history read once for all samples; expert dispatch chosen per layer shape, see
    experts.py) for the benchmark's before/after rows; results are the same either way, up to float rounding.
    adaptive: (metric, threshold) of adaptive K (see the module's docstring), or None: every token at K.
    """

    def __init__(self, model, taus: list[float], num_experts: list[int], num_samples: int, cache: str,
                 seeds: list[int], record_experts: bool = False, share_layers: bool = True,
                 fold_samples: bool = True, choose_dispatch: bool = True, aggregate: str = "probs",
                 capacity: int | None = None, compile: str | None = None, adaptive: tuple | None = None):
        self.model = model
        self.cache_arg = cache_argument(model)  # the forward keyword of the KV cache in this transformers
        self.taus = taus
        self.num_experts = num_experts
        self.k = num_samples
        self.clean = cache == "clean"
        self.how = aggregate
        self.record = record_experts
        self.fold = fold_samples
        self.choose_dispatch = choose_dispatch
        self.adaptive = adaptive if num_samples > 1 else None  # K = 1: nothing to skip
        if self.adaptive is not None and not self.clean:
            raise ValueError("adaptive K needs cache='clean'")
        noisy = [layer for (layer, _), tau in zip(find_moe_layers(model), taus) if tau > 0]
        # the decoder layer where a prompt's K samples separate (None: they never do)
        self.fanout = (noisy[0] if noisy else None) if share_layers else 0
        self.noisy = frozenset(m for m, t in enumerate(taus) if t > 0)
        self.windows = sliding_windows(text_config(model.config))  # a multimodal model: its language model's
        self.chunks = attention_chunks(text_config(model.config))
        self.owners = {c: d for c, d in attention_owners(model).items() if c != d}
        self.recurrent = has_recurrent_state(model)  # hybrid: some layers keep a state (state.py)
        own = own_cache_class(model) if self.recurrent else None  # a model that accepts only its own cache class
        if self.recurrent and self.clean:
            check_clean_support(model)
        self.chosen: list[list[torch.Tensor | None]] = []  # per forward: per MoE layer [rows*S, top_k]
        self.device = next(model.parameters()).device
        self.compile = compile if self.clean and not record_experts else None
        if compile is not None and not self.clean:
            warnings.warn("roe: the full cache runs eagerly (only the clean cache's decode step is compiled)",
                          stacklevel=3)
        elif self.compile is not None and getattr(model, "_can_compile_fullgraph", True) is False:
            # the model says its forward cannot be one graph (data-dependent expert loops: DBRX, JetMoE, LongCat)
            warnings.warn(f"roe: {type(model).__name__} cannot compile as one graph; its decode step runs eagerly",
                          stacklevel=3)
            self.compile = None
        self.batch = len(seeds)  # the caller's prompts; a compiled pass runs B >= batch rows, the rest idle
        B = _power_of_two(self.batch) if self.compile is not None else self.batch
        self.capacity = (_capacity_bucket if self.compile is not None else _round_up)(capacity or 1)
        self.length = 0  # slots used so far, the same for every prompt (host-side: never read from the device)
        self.seeds = self._to_device(torch.tensor(list(seeds) + [0] * (B - self.batch), dtype=torch.long))  # [B]
        self.tau_values = self._to_device(torch.tensor(taus, dtype=torch.float32))  # [L]
        self._finalizer = None
        if self.compile is not None:
            # a compiled step (CUDA graphs: fixed addresses) serves passes of one shape that take turns with
            # one set of buffers, released when a pass is garbage
            pool = _buffer_pool(model, (B, self.capacity))
            static = self.device.type == "cuda"
            state = pool.pop() if pool else _DeviceState.new(B, self.capacity, self.device, static=static,
                                                             cache=clean_cache(own, self.capacity, static))
            state.reset()
            self._finalizer = weakref.finalize(self, pool.append, state)
        elif self.clean:
            state = _DeviceState.new(B, self.capacity, self.device, static=False,
                                     cache=clean_cache(own, self.capacity, False))
        else:
            state = _DeviceState.new(B, self.capacity, self.device, static=False, cache=own() if own else DynamicCache(config=model.config))
        # per-pass state on the device, advanced in place by every step
        self.cache = state.cache
        self.valid = state.valid  # [B, capacity] bool: slots that hold real tokens
        self.next_pos = state.next_pos  # [B, 1] position of each prompt's next token
        self.slot = state.slot  # [1] the next slot, for the static step
        self.gate = state.gate  # [B] bool, adaptive K: whether the next input token's noisy samples take effect
        self.last_gate: torch.Tensor | None = None  # [B, S] the gate of each position of the last forward

    @property
    def compiled(self) -> bool:
        """Whether decode steps run through torch.compile (once the cache holds its first chunk)."""
        return self.compile is not None

    def kv_cache_bytes(self) -> int:
        return cache_bytes(self.cache)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Process history tokens without producing predictions: clean path only under clean cache."""
        if ids.shape[1]:
            self._run(self._idle_rows(ids, 0), self._idle_rows(mask.bool(), False), 1 if self.clean else self.k,
                      logits_to_keep=1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, S] -> logits [B, K, S, V] for the next token after each position (eager)."""
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.bool)
        logits = self._run(self._idle_rows(ids, 0), self._idle_rows(mask.bool(), False), self.k, logits_to_keep=0)
        return logits[: self.batch]

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """The aggregated log-probs [B, S, V] of the last `forward`'s logits [B, K, S, V]: `aggregate`, and with
        adaptive K the clean distribution at the positions it skipped (the chunk ran every position at K)."""
        gate = None if self.adaptive is None or self.last_gate is None else self.last_gate[: logits.shape[0]]
        return aggregate_gated(logits, self.how, gate)

    def _idle_rows(self, t: torch.Tensor, fill) -> torch.Tensor:
        """t [batch, ...] -> [B, ...]: the rows a compiled pass adds to round its batch up, filled with `fill`
        (padding that no valid slot ever shows to a real row)."""
        B = self.seeds.shape[0]
        return t if t.shape[0] == B else torch.cat([t, t.new_full((B - t.shape[0], *t.shape[1:]), fill)])

    def decode(self, ids: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """One token per prompt, ids [B, 1]; alive [B] bool marks the prompts still generating (the others'
        rows run on, masked out). Returns the aggregated log-probs of the next token [B, V], float32."""
        alive = torch.ones(ids.shape[0], dtype=torch.bool) if alive is None else alive.reshape(ids.shape[0])
        ids, alive = self._idle_rows(ids, 0), self._idle_rows(alive.bool(), False)
        if self.compile is None or self.cache.empty or self.length + 1 > self.capacity:
            out = self.combine(self._run(ids, alive[:, None], self.k, logits_to_keep=0))[:, -1]
            return out[: self.batch]
        # fresh tensors with the canonical strides (a [1, 1] slice keeps its parent's, and the graph is
        # specialised to strides): one graph whichever tensor the caller hands in
        ids, alive = (self._to_device(t.clone(memory_format=torch.contiguous_format)) for t in (ids, alive))
        step = self._step(self.k, self.next_pos, self.slot, self.valid)
        out = self._compiled_step(step, ids, alive)
        if out is None:  # torch.compile could not build the step: this pass goes on eagerly
            return self.decode(ids, alive)
        self.length += 1
        self.cache.length = self.length
        out = out[: self.batch]
        # a CUDA graph writes its output into the same memory at every replay: a caller that keeps the log-probs
        # of one step (a list of them, a server's top logprobs) would see them change under it at the next
        return out.clone() if replays_cuda_graphs(self.compile, self.device.type) else out

    def _compiled_step(self, step: _Step, ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor | None:
        """The compiled decode step, or None (with a one-line warning) where torch.compile fails to build it.

        Building fails before the step runs (tracing, the backend's compiler, the limit on graphs per
        function), so the pass's state is untouched and the step can be run again eagerly."""
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        limit = getattr(config, name)
        setattr(config, name, max(limit, COMPILED_SHAPES))
        try:
            return self._call(step, compiled_decode(self.compile, self.device.type), self, ids, alive)
        except _compile_failures() as e:
            warnings.warn(f"roe: torch.compile could not build the decode step ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); this pass decodes eagerly", stacklevel=3)
            self.compile = None
            return None
        finally:
            setattr(config, name, limit)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor onto the model's device without waiting for the device (a plain copy would sync)."""
        if t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":  # pinned: the copy is queued, the host goes on
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _step(self, k: int, positions, slots, valid) -> _Step:
        record = [None] * len(self.taus) if self.record else None
        # adaptive K gates the noise of one-position steps; a longer chunk runs at K and `combine` applies the rule
        gate = self.gate if self.adaptive is not None and k > 1 and positions.shape[1] == 1 else None
        return _Step(k=k, fanout=self.fanout if k > 1 else None, noisy=self.noisy if k > 1 else frozenset(),
                     taus=self.tau_values, seeds=self.seeds, positions=positions, slots=slots, valid=valid,
                     windows=self.windows, cache=self.cache if self.clean else None, fold=self.fold, chosen=record,
                     chunks=self.chunks, owners=self.owners, gate=gate)

    def _advance_gate(self, clean: torch.Tensor, mask: torch.Tensor) -> None:
        """Adaptive K after a forward: clean logits [B, S', V] of the chunk's last S' positions (mask [B, S]: its
        real tokens) -> last_gate [B, S'], the gate each of those positions ran under, and the gate for the next
        token. A position's gate is the rule applied to the clean prediction at the last real token before it;
        with none (the first token, or padding only) the noisy samples take effect."""
        shown = mask[:, mask.shape[1] - clean.shape[1]:]  # [B, S'] the positions the logits belong to
        wants = uncertain(clean, *self.adaptive)  # [B, S'] the rule applied to each position's clean prediction
        S = shown.shape[1]
        last = torch.where(shown, torch.arange(S, device=shown.device), -1).cummax(1).values  # [B, S']
        after = torch.where(last >= 0, wants.gather(1, last.clamp(min=0)), self.gate[:, None])  # [B, S']
        self.last_gate = torch.cat([self.gate[:, None], after[:, :-1]], dim=1)
        self.gate.copy_(after[:, -1])

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        if self._finalizer is not None:  # grown buffers no longer fit their pool's shape
            self._finalizer.detach()
            self._finalizer = None
        capacity = _round_up(max(slots, 2 * self.capacity))
        self.valid = F.pad(self.valid, (0, capacity - self.capacity))
        if self.clean:
            self.cache.grow(capacity)
        self.capacity = capacity

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, k: int, logits_to_keep: int) -> torch.Tensor:
        """An eager forward of a chunk ids [B, S] (mask: its real tokens) -> logits [B, K or 1 expanded to K, S', V]."""
        B, S = ids.shape
        if steps_one_position_at_a_time(self.recurrent, self.length, S,
                                        self.clean and k > 1 and self.fanout is not None):
            outs, gates = [], []
            for s in range(S):
                outs.append(self._run(ids[:, s : s + 1], mask[:, s : s + 1], k, logits_to_keep))
                gates.append(self.last_gate)
            if self.adaptive is not None:
                self.last_gate = gates[-1] if logits_to_keep == 1 else torch.cat(gates, dim=1)
            return outs[-1] if logits_to_keep == 1 else torch.cat(outs, dim=2)
        ids, mask = self._to_device(ids), self._to_device(mask.bool())
        self._reserve(self.length + S)
        start, end = self.length, self.length + S
        with torch.inference_mode():
            self.valid[:, start:end] = mask
            positions = (self.next_pos + mask.long().cumsum(1) - 1).clamp(min=0)  # [B, S]
            slots = torch.arange(start, end, device=self.device)
            step = self._step(k, positions, slots, self.valid[:, :end])
            kwargs = dict(input_ids=ids, position_ids=positions, **{self.cache_arg: self.cache}, use_cache=True,
                          logits_to_keep=logits_to_keep)
            if not self.clean or self.recurrent:  # the model's own attention; its mask is built for B rows and
                # widened at the fan-out. Recurrent layers zero their padding inputs by it (the clean attention
                # has no mask function: transformers builds none for it)
                kwargs["attention_mask"] = self.valid[:, :end].long()
            logits = self._call(step, lambda: _forward(self.model, self.cache, kwargs))
            if self.adaptive is not None:  # the clean row of each prompt: row 0 of its K (or its only row)
                self._advance_gate(logits.view(B, -1, *logits.shape[1:])[:, 0], mask)
            self.next_pos += mask.long().sum(1, keepdim=True)
            self.slot.fill_(end)
        self.length = end
        if self.clean:
            self.cache.length = end
        if step.chosen is not None:
            self.chosen.append(step.chosen)
        logits = logits.view(B, -1, logits.shape[1], logits.shape[2])  # [B, K or 1, S, V]
        return logits.expand(B, k, *logits.shape[2:])  # no noisy layer: the K samples are one computation

    def _call(self, step: _Step, fn, *args):
        """Run fn(*args) with the hooks, the attention and the expert dispatch of this step in place."""
        config = text_config(self.model.config)  # the language model's config: the layers RoE runs read it
        saved_attn = config._attn_implementation
        saved_experts = getattr(config, "_experts_implementation", None)
        route_token = ACTIVE.set(step)
        widen_token = LAYER_INPUTS.set(step.widen)
        clean_token = _CLEAN.set(step)
        index_token = sparse_index.INDEXER_MASK.set(step.indexer_mask if self.clean else None)
        try:
            if self.choose_dispatch and saved_experts == "grouped_mm":  # transformers' default; a user's choice stays
                config._experts_implementation = expert_dispatch.AUTO
            if self.clean:
                config._attn_implementation = CLEAN_ATTENTION
            with torch.inference_mode():
                return fn(*args)
        finally:
            config._attn_implementation = saved_attn
            if saved_experts is not None:
                config._experts_implementation = saved_experts
            _CLEAN.reset(clean_token)
            sparse_index.INDEXER_MASK.reset(index_token)
            LAYER_INPUTS.reset(widen_token)
            ACTIVE.reset(route_token)


@dataclass(eq=False)
class _DeviceState:
    """The device tensors a pass advances in place: its cache, the valid-slot mask, positions and next slot."""

    cache: CleanCache | DynamicCache
    valid: torch.Tensor
    next_pos: torch.Tensor
    slot: torch.Tensor
    gate: torch.Tensor  # [B] bool: adaptive K's decision for each prompt's next token

    @classmethod
    def new(cls, batch: int, capacity: int, device, static: bool, cache=None) -> _DeviceState:
        state = cls(cache if cache is not None else CleanCache(capacity, static),
                    torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                    torch.zeros(batch, 1, dtype=torch.long, device=device),
                    torch.zeros(1, dtype=torch.long, device=device),
                    torch.ones(batch, dtype=torch.bool, device=device))
        if static:
            for t in (state.valid, state.next_pos, state.slot, state.gate):
                torch._dynamo.mark_static_address(t)
        return state

    def reset(self) -> None:
        """Forget the previous pass (its keys stay in the buffers, masked out by `valid`)."""
        for t in (self.valid, self.next_pos, self.slot):
            t.zero_()
        self.gate.fill_(True)  # no clean prediction yet: the first token runs its noisy samples
        self.cache.length = 0
        self.cache.reset_states()


def _buffer_pool(model, key) -> list:
    pools = getattr(model, "_roe_buffer_pool", None)
    if pools is None:
        pools = {}
        model._roe_buffer_pool = pools
    return pools.setdefault(key, [])


def _round_up(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _capacity_bucket(n: int) -> int:
    return CAPACITY_STEP * _power_of_two(-(-n // CAPACITY_STEP))


def decode_step(run: RoEPass, ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """The static decode step: ids [B, 1], alive [B] (device) -> aggregated log-probs [B, V].

    Shapes are fixed for a pass (B, K, capacity); every per-step quantity (the slot, the positions, the
    valid-slot mask) is a device tensor advanced in place, so the step compiles as one graph without breaks.
    """
    run.valid.index_copy_(1, run.slot, alive[:, None])
    logits = _forward(run.model, run.cache, dict(input_ids=ids, position_ids=run.next_pos,
                                                 **{run.cache_arg: run.cache}, use_cache=True))
    run.next_pos.add_(alive[:, None].long())
    run.slot.add_(1)
    B = ids.shape[0]
    logits = logits.view(B, -1, logits.shape[-1])  # [B*K or B, 1, V] -> [B, K or 1, V]
    if run.adaptive is None:
        return aggregate(logits, run.how)  # [B, V]
    out = aggregate_gated(logits, run.how, run.gate)  # the gate this step ran under, then the next token's
    run.gate.copy_(torch.where(alive, uncertain(logits[:, 0], *run.adaptive), run.gate))
    return out


def _forward(model, cache, kwargs: dict) -> torch.Tensor:
    """The model's logits; then the clean cache keeps the clean rows of states the model advanced in place."""
    logits = model(**kwargs).logits
    if isinstance(cache, CleanCache):
        cache.settle()
    return logits


_COMPILED: dict[tuple, object] = {}


def _compile_failures() -> tuple[type[Exception], ...]:
    """What torch.compile raises when it cannot build a graph (before running anything)."""
    names = ("Unsupported", "BackendCompilerFailed", "FailOnRecompileLimitHit", "UserError")
    return tuple(getattr(torch._dynamo.exc, n) for n in names if hasattr(torch._dynamo.exc, n))


def replays_cuda_graphs(backend, device_type: str) -> bool:
    return backend == "inductor" and device_type == "cuda"


def compiled_decode(backend, device_type: str):
    """`decode_step` compiled once per (backend, device type); torch.compile keeps one graph per shape."""
    key = (backend, device_type)
    if key not in _COMPILED:
        options = dict(mode="reduce-overhead") if replays_cuda_graphs(backend, device_type) else {}
        _COMPILED[key] = torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False, **options)
    return _COMPILED[key]
