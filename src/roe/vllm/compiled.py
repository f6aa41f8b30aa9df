"""RoE decode steps inside vLLM's compiled model (torch.compile; on the CPU vLLM traces once and runs inductor).

A decode-only step has one RoE token per row (R = N), so its noisy rows are a fixed function of the batch: K-1
copies of every row, appended after the N rows (row N + r*(K-1) + k-1 is sample k of sequence r, the eager
steps' order). vLLM traces the model once and then drops the guards, so nothing in the traced graph may depend
on Python state. In a trace the plugin's hooks therefore emit

* the fan-out as tensor ops (`widen`: every N-row input of a decoder layer from the fan-out on gets its copies);
* the noisy rows' routing and their attention as custom ops (`roe::route`, `roe::attention`), opaque to Dynamo,
  whose implementations run model.py's eager code at run time and read the step that the model's forward (which
  runs outside the compiled graph) set up: the Gumbel noise, the sequences, vLLM's attention metadata.

Steps with a prefill chunk (R != N), which this graph cannot express, run eagerly (vLLM's `skip_compiled`), as
every RoE step did before. A compiled call without a RoE step (vLLM's dummy and profiling runs) computes the
noisy rows with the clean routing and the forward drops them. Architectures whose hooks have no compiled form
(MLA, Gated DeltaNet, DeepSeek's parked rows) run every RoE step eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch

_HANDLES: list[Callable] = []  # what a custom op runs at run time, by the integer baked into the graph


def register(fn: Callable) -> int:
    _HANDLES.append(fn)
    return len(_HANDLES) - 1


@torch.library.custom_op("roe::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, handle: int) -> torch.Tensor:
    return _HANDLES[handle](query, key, value)


@attention.register_fake
def _(query, key, value, handle):
    return torch.empty_like(query)  # [rows, Hq*D]: vLLM's attention output has the query's shape


@torch.library.custom_op("roe::route", mutates_args=())
def route(router_logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
          handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _HANDLES[handle](router_logits, weights, ids)


@route.register_fake
def _(router_logits, weights, ids, handle):
    return torch.empty_like(weights), torch.empty_like(ids)


def widen(k: int, args: tuple, kwargs: dict):
    """The traced fan-out: the inputs with the fewest rows (N: the positions, and the hidden states and residual
    at the fan-out layer) get K-1 copies of every row appended; the widened ones pass unchanged."""
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim()]
    if not tensors:
        return None
    n = min(x.shape[0] for x in tensors)

    def grow(x):
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n:
            return torch.cat([x, x.repeat_interleave(k - 1, dim=0)], dim=0)  # [N*K, ...]
        return x

    return tuple(grow(a) for a in args), {name: grow(v) for name, v in kwargs.items()}
