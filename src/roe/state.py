"""The clean cache for recurrent layers: linear attention, Mamba, short convolutions (hybrid MoEs).

The attention's clean cache (engine.CleanCache) stores the clean sample's keys/values and lets a noisy sample
attend to them plus its own key/value. A recurrent layer's history is a state instead (a convolution window,
a recurrent matrix), and the same rule reads: a noisy sample at position t uses the clean state after t - 1
tokens, advanced one step with its own input at t, for its own output only; that advanced state is dropped.

`RecurrentStates` is the part of the clean cache that answers the recurrent-state API of transformers' cache
(`get_conv_state`, `update_conv_state`, `get_recurrent_state`, `update_recurrent_state`, `has_previous_state`,
`is_recording_past`, and MiniMax's `get_linear_cache` / `set_linear_cache`), so each model's own code runs its
own step:
- stored: one state per prompt ([B, ...]), written from the clean rows only (rows [::k] of a layer that has
  k rows per prompt), so the stored state is the same for every K;
- read: each of the B*K rows gets a fresh copy of its prompt's clean state (repeat_interleave). A model that
  advances its state in place (the fused single-token conv and Mamba updates) advances that copy; `settle`,
  after the forward, keeps the copy's clean rows and drops the rest. A model that hands its new state to
  `update_*` gets its clean rows stored the same way.
A layer with k rows per prompt takes one position per forward (a decode step): the engine runs a longer chunk
of K samples position by position (`steps_one_position_at_a_time`), so a noisy row at chunk position s always
starts from the clean state after s - 1. A layer with one row per prompt (the clean prefill, the shared leading
layers) is handed the stored buffer itself and may take any chunk.
"""

from __future__ import annotations

import sys

import torch

# layer types (config.layer_types / layers_block_type) that keep a recurrent or convolution state
RECURRENT_TYPES = {"linear_attention", "mamba", "conv", "hybrid", "hybrid_sliding", "mamba2", "ssm", "M"}


def has_recurrent_state(model) -> bool:
    """Whether some decoder layer of the model keeps a recurrent or convolution state between forwards."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:  # transformers' own view: the per-layer cache it would build (5.2x)
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        layers = DynamicCache(config=config).layers
        if any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers):
            return True
    except (ImportError, TypeError, ValueError, AttributeError):
        pass
    for name in ("layer_types", "layers_block_type", "hybrid_override_pattern"):
        types = getattr(config, name, None)
        if isinstance(types, str):
            types = list(types)
        if types and any(t in RECURRENT_TYPES for t in types):
            return True
    return False


def check_clean_support(model) -> None:
    """One line where the installed transformers' hybrid layers read their state another way than the clean
    cache answers (before the per-layer recurrent-state API, `Cache.get_conv_state`: their code reaches into
    `cache.layers[i].conv_states` directly)."""
    from transformers import Cache

    if own_cache_class(model) is None and not hasattr(Cache, "get_conv_state"):
        from transformers import __version__

        from .adapters import UnsupportedModelError

        raise UnsupportedModelError(
            f"cache='clean' on the hybrid '{model.config.model_type}' needs transformers' per-layer recurrent-state "
            f"API (Cache.get_conv_state; tested with 5.24), not {__version__}: upgrade, or use cache='full'")


def own_cache_class(model) -> type | None:
    """The cache class a model's own module defines (MiniMax's MiniMaxCache, which its forward insists on), or None.

    A DynamicCache subclass defined in the modeling module itself; models that use transformers' caches have none.
    """
    from transformers import DynamicCache

    module = sys.modules.get(type(model).__module__)
    for obj in vars(module).values() if module else ():
        if isinstance(obj, type) and issubclass(obj, DynamicCache) and obj.__module__ == module.__name__:
            return obj
    return None


def state_bytes(cache) -> int:
    """Bytes of the recurrent and convolution states a transformers cache holds (the full cache)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for store in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for t in (store or {}).values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    for t in getattr(cache, "linear_cache", []) or []:  # MiniMax's own cache
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


class RecurrentStates:
    """The clean recurrent and convolution states of every (layer, state index): [B, ...] per prompt.

    Mixed into engine.CleanCache, which provides `_rows_per_prompt(layer)` (the k of the running forward)
    and `static_addresses` (CUDA graphs: buffers keep their address).
    """

    def _init_states(self) -> None:
        self.states: dict[tuple, torch.Tensor] = {}  # (kind, layer, index) -> [B, ...]
        self.live: set[tuple] = set()  # keys holding this pass's state (a pooled cache's buffers outlive a pass)
        self.kernel: dict[tuple, int] = {}  # convolution windows
        self.pending: dict[tuple, torch.Tensor] = {}  # this forward's [B*K, ...] copies, kept by `settle`

    def _rows_per_prompt(self, layer: int) -> int:
        raise NotImplementedError

    def _read(self, key: tuple) -> torch.Tensor | None:
        if key not in self.live:
            return None
        k = self._rows_per_prompt(key[1])
        if k == 1:  # one row per prompt: the stored state itself (an in-place update is the clean one)
            return self.states[key]
        rows = self.states[key].repeat_interleave(k, 0)  # [B*K, ...]: each row its prompt's clean state
        self.pending[key] = rows
        return rows

    def _write(self, key: tuple, new: torch.Tensor) -> None:
        """Store the clean rows of new [B*k, ...] (rows [::k])."""
        k = self._rows_per_prompt(key[1])
        clean = new[::k]
        self.pending.pop(key, None)  # the model handed its new state over: its copy is no longer the state
        if key not in self.states:
            buf = torch.zeros_like(clean)
            if self.static_addresses:
                torch._dynamo.mark_static_address(buf)
            self.states[key] = buf
        self.states[key].copy_(clean)
        self.live.add(key)

    def _check_one_position(self, layer: int, length: int) -> None:
        if length > 1 and self._rows_per_prompt(layer) > 1:
            raise RuntimeError("roe: a recurrent layer with K samples per prompt takes one position per forward")

    def settle(self) -> None:
        """After a forward: keep the clean rows of the copies the model advanced in place."""
        for key, rows in self.pending.items():
            buf = self.states[key]
            buf.copy_(rows[:: rows.shape[0] // buf.shape[0]])
        self.pending.clear()

    def reset_states(self) -> None:
        self.live.clear()
        self.pending.clear()

    # --- transformers' recurrent-state API (5.2x per-layer caches) ---

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self._read(("conv", layer_idx, state_idx))

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self._read(("recurrent", layer_idx, state_idx))

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """conv_states [N, C, S] (this chunk's inputs) -> [N, C, window + S]: the stored window before them
        (zeros before the first chunk, as transformers pads), which the model's convolution reads."""
        key = ("conv", layer_idx, state_idx)
        self._check_one_position(layer_idx, conv_states.shape[-1])
        width = self.kernel.setdefault(key, conv_kernel_size or conv_states.shape[-1])
        previous = self._read(key)
        if previous is None:
            full = torch.nn.functional.pad(conv_states, (max(0, width - conv_states.shape[-1]), 0))
        else:
            full = torch.cat([previous.to(conv_states.dtype), conv_states], dim=-1)
        self._write(key, full[..., -width:])
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        self._write(("recurrent", layer_idx, state_idx), recurrent_states)
        return recurrent_states

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return any(key[1] == layer_idx or layer_idx is None for key in self.live
                   if state_idx is None or key[2] == state_idx)

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    # --- MiniMax's lightning attention keeps its K^T V state through its own two methods ---

    def get_linear_cache(self, layer_idx: int):
        return self.get_recurrent_state(layer_idx)

    def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
        self.update_recurrent_state(linear_cache, layer_idx)

    def state_bytes(self) -> int:
        return sum(self.states[key].numel() * self.states[key].element_size() for key in self.live)


def steps_one_position_at_a_time(recurrent: bool, length: int, chunk: int, samples_differ: bool) -> bool:
    """Whether a chunk of `chunk` positions runs as single-position forwards in a model with recurrent layers.

    With K samples per prompt, a noisy row at chunk position s needs the clean state after s - 1, which a
    chunked recurrence does not expose: one position per forward gives it, each forward being the decode step
    (memory: one state per row at a time, as in decoding). A chunk that continues a history runs that way too
    at K = 1, since some transformers implementations (Mamba's full-sequence scan) ignore a stored state.
    Under the full cache every row has its own state, so only a continuing chunk needs it. A single-position
    forward gets no padding mask from transformers (a decode token is never padding), so such chunks must be
    right-padded, as scoring's are: a padded position then only follows its row's real tokens.
    """
    return recurrent and chunk > 1 and (length > 0 or samples_differ)
