"""The `roe` key of a vLLM deployment's hf config: which architectures, and the settings' validation.

Only torch-free, vLLM-free code here: the settings are checked with the project's own RoEConfig, so the
errors read the same as the engine's, prefixed with `roe:`.
"""

from __future__ import annotations

from ..config import RoEConfig

# vLLM architecture name -> (vLLM module under vllm.model_executor.models, class): RoE runs there
SUPPORTED: dict[str, tuple[str, str]] = {
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "GraniteMoeForCausalLM": ("granitemoe", "GraniteMoeForCausalLM"),
    # vllm-ports
    "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
    "Llama4ForCausalLM": ("llama4", "Llama4ForCausalLM"),  # text only
    "PhiMoEForCausalLM": ("phimoe", "PhiMoEForCausalLM"),
    # vllm-mla: MLA's latent cache (mla.py); Gated DeltaNet states (recurrent.py)
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
    "Qwen3NextForCausalLM": ("qwen3_next", "Qwen3NextForCausalLM"),
}

# for the one-line refusals
SUPPORTED_NAMES = "OLMoE, Mixtral, Qwen2/3-MoE, Qwen3-Next, GraniteMoE, GLM-4.5, GPT-OSS, Llama 4, PhiMoE, DeepSeek-V2/3"

_PORT = "is a Mixture-of-Experts architecture the RoE vLLM plugin does not support yet"
_DENSE = "is not a Mixture-of-Experts model: RoE perturbs expert routing and needs an MoE"
# more specific reasons for some of the architectures that refuse to start with `roe` set (every architecture
# not in SUPPORTED refuses, see gate.py; they run unchanged without `roe`)
GUARDED: dict[str, tuple[str, str, str]] = {
    "Ernie4_5_MoeForCausalLM": ("ernie45_moe", "Ernie4_5_MoeForCausalLM", _PORT + " (biased router)"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM", _DENSE),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM", _DENSE),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM", _DENSE),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM", _DENSE),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM", _DENSE),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM", _DENSE),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM", _DENSE),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM", _DENSE),
}

FIELDS = ("num_samples", "tau", "skip_layers", "aggregate", "cache", "seed", "adaptive_metric", "adaptive_threshold",
          "profile")


class RoESettingsError(RuntimeError):
    """A `roe` setting vLLM cannot start with; the message is one line starting with `roe:`. Not a ValueError:
    vLLM builds its configs with pydantic, which rewraps a ValueError into a multi-line ValidationError."""


def settings_from_hf_config(hf_config) -> RoEConfig | None:
    """The deployment's RoEConfig from `hf_config.roe` (None: no `roe` key, the plugin stays out of the way)."""
    raw = getattr(hf_config, "roe", None)
    if raw is None:
        return None
    if isinstance(raw, RoEConfig):
        return raw
    if not isinstance(raw, dict):
        raise RoESettingsError(f"roe: expected a JSON object of RoE settings, got {raw!r}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise RoESettingsError(
            f"roe: unknown field(s) {', '.join(map(repr, unknown))}; the known fields are {', '.join(FIELDS)}"
        )
    fields = dict(raw)
    profile = fields.pop("profile", None)
    try:
        cfg = RoEConfig.from_profile(profile, **fields) if profile is not None else RoEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise RoESettingsError(f"roe: {e}") from None
    if cfg.cache != "clean":
        raise RoESettingsError(
            "roe: cache='full' is not available in vLLM: the plugin implements the clean cache (only the clean "
            "sample's keys/values go to vLLM's paged cache); use cache='clean'"
        )
    return cfg
