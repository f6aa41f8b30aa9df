"""One small adapter per router family: find a model's MoE routers and perturb their choice.

transformers 5.x MoE blocks call a router module that returns
`(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`. We leave the
model's code alone and add a forward hook on each router, plus a forward pre-hook
on each decoder layer through which the engine can widen a layer's inputs (it
copies each prompt's rows into its K samples at the first noisy layer). Outside a
RoE pass the hooks return nothing, so the model behaves exactly as before;
`unpatch` removes them. Adding an architecture is one `register(...)` line below.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import routing


@dataclass(frozen=True)
class RouterAdapter:
    block_attr: str  # attribute of a decoder layer that holds the MoE block
    router_attr: str  # attribute of the MoE block that holds the router
    select: Callable  # (router, logits [T, E], noise [T, E]) -> (weights [T, k], indices [T, k])


ADAPTERS: dict[str, RouterAdapter] = {}


def cache_argument(model) -> str:
    """The forward keyword that takes a KV cache: `cache` from transformers 5.24 on (which warns on
    `past_key_values`), `past_key_values` before; read off the model's own signature."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_kwargs(model, kv_cache) -> dict:
    return {cache_argument(model): kv_cache}


def register(model_type: str, adapter: RouterAdapter) -> None:
    ADAPTERS[model_type] = adapter


def _norm_flag(router, logits, noise):
    return routing.softmax_topk(router, logits, noise, normalize=router.norm_topk_prob)


_always_norm = partial(routing.softmax_topk, normalize=True)
_never_norm = partial(routing.softmax_topk, normalize=False)

register("olmoe", RouterAdapter("mlp", "gate", _norm_flag))
register("flex_olmo", RouterAdapter("mlp", "gate", _norm_flag))
register("qwen2_moe", RouterAdapter("mlp", "gate", _norm_flag))
register("qwen3_moe", RouterAdapter("mlp", "gate", _norm_flag))
register("mixtral", RouterAdapter("mlp", "gate", _always_norm))
register("hunyuan_v1_moe", RouterAdapter("mlp", "gate", _always_norm))
register("gpt_oss", RouterAdapter("mlp", "router", routing.topk_softmax))
register("granitemoe", RouterAdapter("block_sparse_moe", "router", routing.topk_softmax))
register("deepseek_v3", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("glm4_moe", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("dots1", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("ernie4_5_moe", RouterAdapter("mlp", "gate", routing.softmax_bias_topk))
# DeepSeek-like (arch-c)
register("deepseek_v2", RouterAdapter("mlp", "gate", routing.softmax_group_limited))
register("deepseek_v32", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))  # + sparse attention (indexer.py)
register("glm_moe_dsa", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))  # + sparse attention (indexer.py)
register("hy_v4", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))  # + sparse attention, sinks
register("solar_open", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("mimo_v2_flash", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("axk1", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("sarvam_mla", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))  # loads as DeepseekV3ForCausalLM
register("kolibri1", RouterAdapter("mlp", "gate", routing.biased_logit_topk_sigmoid))


def supported_architectures() -> list[str]:
    """transformers `model_type` names that RoE can wrap."""
    return sorted(ADAPTERS)


class UnsupportedModelError(ValueError):
    pass


def _decoder_layers(model: nn.Module):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return layers


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The router module of every MoE layer, in layer order."""
    return [router for _, router in find_moe_layers(model)]


def find_moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder-layer index, router) of every MoE layer, in layer order (dense layers are skipped)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    supported = ", ".join(supported_architectures())
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        cfg = model.config
        looks_moe = any(
            getattr(cfg, a, None) for a in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
        )
        if looks_moe:
            raise UnsupportedModelError(
                f"'{model_type}' is a Mixture-of-Experts architecture RoE does not support yet. Supported: {supported}."
            )
        raise UnsupportedModelError(
            f"'{model_type}' is not a Mixture-of-Experts model: RoE perturbs expert routing and needs an MoE. "
            f"Supported architectures: {supported}."
        )
    routers = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, adapter.block_attr, None)
        router = getattr(block, adapter.router_attr, None) if block is not None else None
        if router is not None and hasattr(router, "top_k"):
            routers.append((i, router))
    if not routers:
        raise UnsupportedModelError(
            f"this '{model_type}' model has no MoE layers (every layer is dense); RoE needs at least one. "
            f"Supported architectures: {supported}."
        )
    return routers


def find_experts(model: nn.Module) -> list[nn.Module]:
    """The routed-experts module of every MoE layer, in the order of `find_moe_layers`."""
    block_attr = ADAPTERS[model.config.model_type].block_attr
    layers = _decoder_layers(model)
    return [getattr(layers[i], block_attr).experts for i, _ in find_moe_layers(model)]


class ThreadSlot:
    """A per-thread value with ContextVar's get/set/reset.

    torch.compile traces reads of a threading.local but not ContextVar.get, and the compiled decode
    step reads these slots from inside the graph; a thread-local keeps concurrent threads apart.
    """

    def __init__(self):
        self._local = threading.local()

    def get(self):
        return getattr(self._local, "value", None)

    def set(self, value):
        token = self.get()
        self._local.value = value
        return token

    def reset(self, token) -> None:
        self._local.value = token


class RoutingNoise:
    """Explicit noise for one forward pass (references and benchmarks; the engine computes its own).

    noise: per MoE layer, tau-scaled Gumbel noise [T, E] with zeros on clean rows (None: the layer is clean)
    noisy_rows: [T, 1] bool, True where the token belongs to a noisy sample
    Anything set in ACTIVE offers the same three members: noisy (MoE layers with noise), noise_for(layer,
    num_experts) -> [T, E], noisy_rows; and chosen (None, or a list the hook fills with each layer's choice).
    """

    def __init__(self, noise: list[torch.Tensor | None], noisy_rows: torch.Tensor, record: bool = False):
        self.noise = noise
        self.noisy = frozenset(i for i, n in enumerate(noise) if n is not None)
        self.noisy_rows = noisy_rows
        self.chosen: list[torch.Tensor | None] | None = [None] * len(noise) if record else None

    def noise_for(self, layer: int, num_experts: int) -> torch.Tensor:
        return self.noise[layer]


ACTIVE = ThreadSlot()  # the routing state of the forward pass running on this thread (None: plain model)

# (decoder-layer index, args, kwargs) -> (args, kwargs) or None; set by the engine during a forward
LAYER_INPUTS = ThreadSlot()


def _router_hook(layer: int, select: Callable, router: nn.Module, args, output):
    state = ACTIVE.get()
    if state is None:
        return None
    # (logits, weights, indices); GraniteMoe before transformers 5.18 returned them the other way round
    index_first = not output[0].is_floating_point()
    logits, weights, idx = output[::-1] if index_first else output
    if layer in state.noisy:
        flat = logits.reshape(-1, logits.shape[-1])  # [T, E]
        noisy_w, noisy_idx = select(router, flat, state.noise_for(layer, flat.shape[-1]).to(flat.device))
        rows = state.noisy_rows.to(flat.device)
        weights = torch.where(rows, noisy_w.to(weights.dtype), weights)
        idx = torch.where(rows, noisy_idx.to(idx.dtype), idx)
    if state.chosen is not None:
        state.chosen[layer] = idx.detach()
    return (idx, weights, logits) if index_first else (logits, weights, idx)


def _layer_pre_hook(layer: int, module: nn.Module, args, kwargs):
    widen = LAYER_INPUTS.get()
    return None if widen is None else widen(layer, args, kwargs)


def patch(model: nn.Module) -> list[nn.Module]:
    """Install the hooks once per model; returns the routers in MoE-layer order."""
    routers = find_routers(model)
    if getattr(model, "_roe_hooks", None) is None:
        select = ADAPTERS[model.config.model_type].select
        hooks = [r.register_forward_hook(partial(_router_hook, i, select)) for i, r in enumerate(routers)]
        hooks += [layer.register_forward_pre_hook(partial(_layer_pre_hook, i), with_kwargs=True)
                  for i, layer in enumerate(_decoder_layers(model))]
        from . import indexer  # sparse-attention indexers (DSA) get their mask under the clean cache

        hooks += indexer.install(_decoder_layers(model))
        model._roe_hooks = hooks
    return routers


def unpatch(model: nn.Module) -> None:
    for h in getattr(model, "_roe_hooks", None) or []:
        h.remove()
    if hasattr(model, "_roe_hooks"):
        del model._roe_hooks
