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


def _triple_logits(router, output):
    # (logits, weights, indices); GraniteMoe before transformers 5.18 returned them the other way round
    return output[-1] if not output[0].is_floating_point() else output[0]


def _triple_indices(router, output):
    return output[0] if not output[0].is_floating_point() else output[2]


def _triple_write(router, output, rows, weights, idx):
    index_first = not output[0].is_floating_point()
    logits, old_w, old_idx = output[::-1] if index_first else output
    new_w = torch.where(rows, weights.to(old_w.dtype), old_w)
    new_idx = torch.where(rows, idx.to(old_idx.dtype), old_idx)
    return (new_idx, new_w, logits) if index_first else (logits, new_w, new_idx)


@dataclass(frozen=True)
class RouterOutput:
    """Where a router family keeps its choice, and how the noisy rows' choice replaces it.

    logits(router, out) -> [T, E]; indices(router, out) -> [T, k] (the clean choice, for recording);
    write(router, out, rows [T, 1] bool, weights [T, k], indices [T, k]) -> out with the rows' choice replaced.
    out is the router module's output, or with on_experts the (args, kwargs) of the MoE block's experts
    module (a forward pre-hook): for blocks whose router returns logits only and that choose themselves.
    """

    logits: Callable = _triple_logits
    indices: Callable = _triple_indices
    write: Callable = _triple_write
    on_experts: bool = False


TRIPLE = RouterOutput()  # transformers 5.x routers: (router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])


@dataclass(frozen=True)
class RouterAdapter:
    block_attr: str  # attribute of a decoder layer that holds the MoE block (dotted where nested: "mlp.text_moe";
    # "": the decoder layer itself)
    router_attr: str  # attribute of the MoE block that holds the router ("": the block itself is the router)
    select: Callable  # (router, logits [T, E], noise [T, E], *router_args) -> (weights [T, k], indices [T, k])
    # pass the router's own call arguments after the hidden states on to select (MiniMax-M2 and AFMoE hand
    # their router the expert-score bias that the MoE block holds): the exact bias the model used this call
    router_args: bool = False
    output: RouterOutput = TRIPLE  # how the router's choice is read and replaced
    num_experts_attr: str = "num_experts"  # the router's attribute that counts its logits (the noise's width)
    # (router) -> (top_k, num_experts) for a router that keeps neither as an attribute (Gemma 4's reads its config)
    sizes: Callable | None = None


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

# --- arch-a: issue 23's registry-only types and the sigmoid-bias / Cohere2 / sparsemixer families ---
register("glm4_moe_lite", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))  # DeepSeek-V3's router, MLA
register("sarvam_moe", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))  # runs as Glm4MoeForCausalLM
register("exaone_moe", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("granitemoeshared", RouterAdapter("block_sparse_moe", "router", routing.topk_softmax))
register("granitemoe_swa", RouterAdapter("block_sparse_moe", "router", routing.topk_softmax))
register("cohere2_moe", RouterAdapter("mlp", "gate", routing.topk_softmax_or_sigmoid))
register("minimax_m2", RouterAdapter("mlp", "gate", routing.sigmoid_bias_topk, router_args=True))
register("afmoe", RouterAdapter("mlp", "router", routing.sigmoid_bias_topk, router_args=True))
register("phimoe", RouterAdapter("mlp", "router", routing.sparsemixer_top2))


# --- arch-b: llama4_text, dbrx, jetmoe, longcat_flash ----------------------------------------------


def _scores_write(router, out, rows, weights, idx):
    """Llama 4's router returns (scores [T, E]: sigmoid of the chosen logits, 0 elsewhere; logits [T, E])."""
    scores, logits = out
    noisy = torch.zeros_like(scores).scatter(1, idx, weights.to(scores.dtype))
    return torch.where(rows, noisy, scores), logits


LLAMA4_OUTPUT = RouterOutput(logits=lambda router, out: out[1],
                             indices=lambda router, out: torch.topk(out[1], router.top_k, dim=1).indices,
                             write=_scores_write)


def _jetmoe_write(router, out, rows, weights, idx):
    """JetMoE's gating returns its choice sorted by expert, as its experts read it: (index_sorted_experts,
    batch_index, batch_gates, expert_size, logits). The clean choice is recomputed as the gating computes it,
    the noisy rows' replaces it, and the sorted layout is rebuilt the gating's way."""
    logits, dtype = out[4], out[2].dtype
    clean_logits, clean_idx = logits.topk(router.top_k, dim=1)
    gates = torch.where(rows, weights.to(dtype), torch.softmax(clean_logits, dim=1).type(dtype))  # [T, k]
    idx = torch.where(rows, idx.to(clean_idx.dtype), clean_idx)  # [T, k]
    expert_size = torch.zeros_like(logits, dtype=torch.long).scatter(1, idx, 1).sum(0).tolist()
    _, index_sorted = idx.flatten().sort(0)
    batch_index = index_sorted.div(router.top_k, rounding_mode="trunc")
    return index_sorted, batch_index, gates.flatten()[index_sorted], expert_size, logits


JETMOE_OUTPUT = RouterOutput(logits=lambda router, out: out[4],
                             indices=lambda router, out: out[4].topk(router.top_k, dim=1).indices,
                             write=_jetmoe_write)


def _experts_inputs(out):
    """(hidden [.., D], top_k_index [T, k], top_k_weights [T, k]) from an experts call's (args, kwargs)."""
    args, kwargs = out
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]


def _experts_write(block, out, rows, weights, idx):
    hidden, old_idx, old_w = _experts_inputs(out)
    new_idx = torch.where(rows, idx.to(old_idx.dtype), old_idx)
    new_w = torch.where(rows, weights.to(old_w.dtype), old_w)
    return (hidden, new_idx, new_w), {}


# DBRX's router returns logits and its FFN block chooses: the choice is replaced where the experts receive it,
# and the logits are the router's own, recomputed on the same input (one [T, D] x [D, E] product)
BLOCK_CHOOSES = RouterOutput(logits=lambda block, out: block.router(_experts_inputs(out)[0]),
                             indices=lambda block, out: _experts_inputs(out)[1],
                             write=_experts_write, on_experts=True)

register("llama4_text", RouterAdapter("feed_forward", "router", routing.topk_sigmoid, output=LLAMA4_OUTPUT))
register("dbrx", RouterAdapter("ffn", "", routing.softmax_topk_pnorm, output=BLOCK_CHOOSES,
                               num_experts_attr="experts.num_experts"))  # layers: transformer.blocks
# the MLP router only: JetMoE's attention experts (its MoA router) stay the model's own choice, see README
register("jetmoe", RouterAdapter("mlp", "router", routing.topk_softmax, output=JETMOE_OUTPUT))
register("longcat_flash", RouterAdapter("mlp", "router", routing.softmax_bias_scaled,
                                        num_experts_attr="n_routed_experts"))


# --- arch-d: issue 23's further types (sigmoid routers, group-limited softmax, multimodal language models) ---
register("mellum", RouterAdapter("mlp", "gate", _norm_flag))  # Qwen3-MoE's router
register("aria_text", RouterAdapter("mlp", "router", routing.topk_softmax))
register("flint", RouterAdapter("mlp", "gate", routing.flint_sigmoid_topk))
register("laguna", RouterAdapter("mlp", "gate", routing.laguna_sigmoid_topk))
register("hy_v3", RouterAdapter("mlp", "gate", routing.hy_v3_sigmoid_topk, router_args=True))
register("beam", RouterAdapter("mlp", "gate", routing.sigmoid_grouped_unscaled))
register("mistral4", RouterAdapter("mlp", "gate", routing.softmax_grouped))
register("qwen3_vl_moe_text", RouterAdapter("mlp", "gate", _always_norm))
register("glm4v_moe_text", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("ernie4_5_vl_moe_text", RouterAdapter("mlp.text_moe", "gate", routing.softmax_bias_topk))  # text experts
register("deepseek_ocr2_text", RouterAdapter("mlp", "gate", routing.softmax_topk_v2))
register("muse_spark_text", RouterAdapter("mlp", "gate", routing.muse_spark_sigmoid_topk))
# Gemma 4: router and experts sit on the decoder layer itself (block ""), beside its dense MLP
register("gemma4_text", RouterAdapter("", "router", routing.gemma4_probs_topk,
                                      sizes=lambda r: (r.config.top_k_experts, r.config.num_experts)))

# hybrid MoEs (recurrent / convolution layers beside attention; their states: state.py)
register("qwen3_next", RouterAdapter("mlp", "gate", _norm_flag))
register("qwen3_5_moe_text", RouterAdapter("mlp", "gate", _always_norm))
register("jamba", RouterAdapter("feed_forward", "router", _never_norm))
register("granitemoehybrid", RouterAdapter("block_sparse_moe", "router", routing.topk_softmax))
register("lfm2_moe", RouterAdapter("feed_forward", "gate", routing.sigmoid_expert_bias, router_args=True))
register("kimi_linear", RouterAdapter("mlp", "gate", routing.sigmoid_grouped))
register("minimax", RouterAdapter("mlp", "gate", _always_norm))


def supported_architectures() -> list[str]:
    """transformers `model_type` names that RoE can wrap: the registry's, plus the multimodal top-level types
    (qwen3_5_moe, llama4, qwen3_vl_moe, ...) whose language model is in the registry (RoE runs on it, text in)."""
    return sorted(set(ADAPTERS) | {t for t, text in _multimodal_types().items() if text in ADAPTERS})


class UnsupportedModelError(ValueError):
    pass


def _attribute_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None) if name else obj
    return obj


# MoE model types RoE refuses, with what is missing (one line each); supported ones are in ADAPTERS.
# A test walks transformers' config mapping and fails on an MoE type that is in neither.
_ENCODER_DECODER = "an encoder-decoder MoE: RoE runs decoder-only causal language models"
_RECURRENT = "recurrent-state layers (linear attention, Mamba, convolution) the clean cache does not hold yet"
_INDEXER = "its sparse-attention indexer (which keys each query reads) is not run per noisy sample yet"
_ROUTER = "its router is not a family RoE perturbs yet"
_NOT_TEXT = "not a left-to-right text generator RoE can drive"
REFUSED: dict[str, str] = {
    **dict.fromkeys(["switch_transformers", "nllb-moe"], _ENCODER_DECODER),
    **dict.fromkeys(["bailing_hybrid", "nemotron_h", "qwen4_exp_text", "zaya", "lara_mini", "inkling_text",
                     "inkling2_text", "inkling2_loop_text", "glm5_next_text"], _RECURRENT),
    **dict.fromkeys(["axk2", "hy_v4_vl_text", "dots3_note_text", "minimax_m3_vl_text", "mistral_large4_text"], _INDEXER),
    "deepseek_v4": "compressed sparse attention (compressor state in the cache) and hash-routed layers (no logits)",
    "step3p5": _ROUTER,
    **dict.fromkeys(["diffusion_gemma", "diffusion_gemma_text"], _NOT_TEXT),
}
# --- arch-d: refusals with their own reasons ---
REFUSED.update({
    "doge": "product-key expert retrieval inside its MoE block (no router to hook) and value-dependent dynamic attention "
            "masks",
    "unlimited_ocr_text": "reference sliding-window attention (prefill kept whole, a window over decoded tokens): "
                          "not in the clean cache",
    "qwen3_omni_moe_thinker": "an omni (audio, image, video) model's thinker: no tiny omni checkpoint tests RoE on it",
})
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def text_config(config):
    """The language model's config: the config itself, or a multimodal config's `text_config`."""
    try:
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    except ValueError:  # several text configs (an encoder-decoder with a text encoder): none is "the" LM
        return config


def registry_type(config) -> str:
    """The registry key of a model: its language model's `model_type` (`qwen3_5_moe_text` for a qwen3_5_moe
    checkpoint, which AutoModelForCausalLM loads as its text model)."""
    return getattr(text_config(config), "model_type", None) or getattr(config, "model_type", "")


def expert_count(config) -> int | None:
    """The routed-expert count wherever the config keeps it (top level, `text_config`, dbrx's `ffn_config`)."""
    for cfg in (config, text_config(config)):
        for source in (cfg, getattr(cfg, "ffn_config", None)):
            for name in EXPERT_COUNT_FIELDS:
                value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                    return value
    return None


def _multimodal_types() -> dict[str, str]:
    """Top-level model type -> its `text_config`'s model type, for every config class in transformers that has one."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = {}
    for name in CONFIG_MAPPING:
        try:
            text = getattr(CONFIG_MAPPING[name], "sub_configs", {}).get("text_config")
        except Exception:  # a config class whose module fails to import (optional dependencies)
            continue
        if getattr(text, "model_type", None):
            out[name] = text.model_type
    return out


def _declares_experts(config_class) -> bool:
    """Whether a config class (or its language model's, or DBRX's `ffn_config`) has a routed-expert count field,
    whatever its default (Dots1 and Gemma 4 default to dense)."""
    import dataclasses

    subs = getattr(config_class, "sub_configs", {}) or {}
    for cls in (config_class, subs.get("text_config"), subs.get("ffn_config")):
        if cls is None:
            continue
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        names |= set(getattr(cls, "__annotations__", {})) | set(getattr(cls, "attribute_map", {}))
        if names & set(EXPERT_COUNT_FIELDS):
            return True
    return False


def transformers_moe_types() -> list[str]:
    """Every model type in this transformers whose config declares routed experts and that loads as a text
    generator (causal LM, multimodal image-text-to-text, or encoder-decoder): walked from its config mapping."""
    from transformers.models.auto import configuration_auto, modeling_auto

    loadable = {**modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                **modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    found = []
    for name in sorted(set(loadable) & set(configuration_auto.CONFIG_MAPPING_NAMES)):
        try:
            config_class = configuration_auto.CONFIG_MAPPING[name]
        except Exception:  # a config whose module needs an optional dependency
            continue
        if _declares_experts(config_class):
            found.append(name)
    return found


def check_supported(config) -> str:
    """The registry key of a supported config, or UnsupportedModelError with one line naming what is missing."""
    top, key = getattr(config, "model_type", "?"), registry_type(config)
    if key in ADAPTERS:
        return key
    see = "see roe.supported_architectures()"
    reason = REFUSED.get(top) or REFUSED.get(key)
    if reason:
        raise UnsupportedModelError(f"RoE does not run '{top}': {reason}; {see}")
    if expert_count(config):
        raise UnsupportedModelError(f"'{top}' is a Mixture-of-Experts architecture RoE does not support yet; {see}")
    raise UnsupportedModelError(f"'{top}' is not a Mixture-of-Experts model: RoE perturbs expert routing; {see}")


# where a model keeps its decoder layers: a causal LM, a multimodal model's language model, DBRX
LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.blocks")


def _decoder_layers(model: nn.Module):
    for path in LAYER_PATHS:
        layers = model
        for part in path.split("."):
            layers = getattr(layers, part, None)
        if layers is not None:
            return layers
    raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers at {' or '.join(LAYER_PATHS)}")


def adapter_for(model: nn.Module) -> RouterAdapter:
    return ADAPTERS[check_supported(model.config)]


def num_experts(model: nn.Module, router: nn.Module) -> int:
    """How many logits a router scores: the width of its noise (LongCat's zero-computation experts count)."""
    adapter = adapter_for(model)
    if adapter.sizes is not None:
        return int(adapter.sizes(router)[1])
    return int(_attribute_path(router, adapter.num_experts_attr))


def attention_owners(model: nn.Module) -> dict[int, int]:
    """Cache layer index -> decoder layer index, for models with several attention blocks per decoder layer
    (LongCat-Flash: decoder layer i holds cache layers 2i and 2i+1). Read off the submodules' `layer_idx`."""
    owners = {}
    for i, layer in enumerate(_decoder_layers(model)):
        for module in layer.modules():
            idx = getattr(module, "layer_idx", None)
            if module is not layer and isinstance(idx, int):
                owners[idx] = i
    return owners


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The router module of every MoE layer, in layer order."""
    return [router for _, router in find_moe_layers(model)]


def find_moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder-layer index, router) of every MoE layer, in layer order (dense layers are skipped)."""
    adapter = adapter_for(model)
    routers = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = _attribute_path(layer, adapter.block_attr)
        router = _attribute_path(block, adapter.router_attr) if block is not None else None
        if router is not None and (adapter.sizes is not None or hasattr(router, "top_k")):
            routers.append((i, router))
    if not routers:
        raise UnsupportedModelError(f"this '{model.config.model_type}' model has no MoE layers (every layer is "
                                    "dense); RoE needs at least one")
    return routers


def expert_counts(model: nn.Module) -> list[int]:
    """The routed-expert count of every MoE layer, in the order of `find_moe_layers`."""
    return [num_experts(model, r) for _, r in find_moe_layers(model)]


def find_experts(model: nn.Module) -> list[nn.Module]:
    """The routed-experts module of every MoE layer, in the order of `find_moe_layers`."""
    block_attr = adapter_for(model).block_attr
    layers = _decoder_layers(model)
    return [_attribute_path(layers[i], block_attr).experts for i, _ in find_moe_layers(model)]


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


def _router_hook(layer: int, adapter: RouterAdapter, router: nn.Module, out, extra=()):
    """Replace the noisy rows' choice in `out` (the router's output, or the experts' (args, kwargs)); extra: the
    router's own call arguments after the hidden states, for adapters with router_args."""
    state = ACTIVE.get()
    if state is None:
        return None
    io, noisy = adapter.output, layer in state.noisy
    idx = io.indices(router, out) if state.chosen is not None else None
    if noisy:
        flat = io.logits(router, out)
        flat = flat.reshape(-1, flat.shape[-1])  # [T, E]
        noise = state.noise_for(layer, flat.shape[-1]).to(flat.device)
        noisy_w, noisy_idx = adapter.select(router, flat, noise, *extra)
        rows = state.noisy_rows.to(flat.device)
        out = io.write(router, out, rows, noisy_w, noisy_idx)
        if idx is not None:
            idx = torch.where(rows, noisy_idx.to(idx.dtype), idx)
    if idx is not None:
        state.chosen[layer] = idx.detach()
    return out


def _forward_hook(layer, adapter, router, module, args, output):
    return _router_hook(layer, adapter, router, output, args[1:] if adapter.router_args else ())


def _experts_pre_hook(layer, adapter, router, module, args, kwargs):
    return _router_hook(layer, adapter, router, (args, kwargs))


def _layer_pre_hook(layer: int, module: nn.Module, args, kwargs):
    widen = LAYER_INPUTS.get()
    return None if widen is None else widen(layer, args, kwargs)


def patch(model: nn.Module) -> list[nn.Module]:
    """Install the hooks once per model; returns the routers in MoE-layer order."""
    routers = find_routers(model)
    if getattr(model, "_roe_hooks", None) is None:
        adapter = adapter_for(model)
        if adapter.output.on_experts:  # the block chooses: its experts' inputs carry the choice
            blocks = [_attribute_path(layer, adapter.block_attr) for layer in _decoder_layers(model)]
            experts = [blocks[i].experts for i, _ in find_moe_layers(model)]
            hooks = [e.register_forward_pre_hook(partial(_experts_pre_hook, i, adapter, r), with_kwargs=True)
                     for i, (e, r) in enumerate(zip(experts, routers))]
        else:
            hooks = [r.register_forward_hook(partial(_forward_hook, i, adapter, r)) for i, r in enumerate(routers)]
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
