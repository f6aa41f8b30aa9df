"""Bad `roe` settings: vLLM refuses to start, with one line that names the problem."""

import json

import pytest

from conftest import start_llm, stop_llm

BAD = [
    ("olmoe", {"num_samples": 8, "tau": 0.3, "temperature": 0.5}, "roe: unknown field(s) 'temperature'"),
    ("olmoe", {"num_samples": 0, "tau": 0.3}, "roe: num_samples (K) must be an integer >= 1, got 0"),
    ("olmoe", {"num_samples": 8, "tau": -0.1}, "roe: tau must be >= 0 (0 is the model's own routing), got -0.1"),
    ("olmoe", {"num_samples": 8, "tau": [0.0, 0.3, 0.0]},
     "roe: tau has 3 values but the model has 4 MoE layers: give one value per MoE layer or a single float."),
    ("olmoe", {"num_samples": 8, "tau": 0.3, "cache": "full"}, "roe: cache='full' is not available in vLLM"),
    ("llama", {"num_samples": 8, "tau": 0.3},
     "roe: 'LlamaForCausalLM' is not a Mixture-of-Experts model: RoE perturbs expert routing and needs an MoE"),
    ("ernie4_5_moe", {"num_samples": 8, "tau": 0.3},
     "roe: 'Ernie4_5_MoeForCausalLM' is a Mixture-of-Experts architecture the RoE vLLM plugin does not support yet"),
    ("olmoe", {"num_samples": 8, "tau": 0.3, "seed": 2**64}, "roe: seed must be an integer in [0, 2**63), got"),
    ("olmoe", {"num_samples": 8, "tau": 0.3, "seed": -1}, "roe: seed must be an integer in [0, 2**63), got -1"),
]


def _messages(exc: BaseException) -> list[str]:
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return out


@pytest.mark.parametrize("arch,roe,message", BAD, ids=["unknown-field", "k0", "negative-tau", "tau-length",
                                                         "full-cache", "dense", "not-ported", "seed-2**64",
                                                         "seed-negative"])
def test_bad_settings_refuse_to_start(checkpoint, arch, roe, message):
    with pytest.raises(Exception) as info:
        llm = start_llm(checkpoint(arch), roe=roe)
        stop_llm(llm)  # only reached if vLLM wrongly started
    lines = [m for m in _messages(info.value) if m.startswith("roe:")]
    assert lines, _messages(info.value)
    assert lines[0].startswith(message), lines[0]
    assert "\n" not in lines[0]


def test_settings_from_a_tuned_profile(tmp_path):
    """`{"roe": {"profile": PATH}}` reads a `roe tune` profile (extra keys are provenance); fields override it."""
    from roe.vllm import RoESettingsError, settings_from_hf_config

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"num_samples": 8, "tau": [0.0, 0.4, 0.2, 0.0], "skip_layers": 1, "seed": 3,
                                   "objective": "perplexity", "trials": 50}))

    class Cfg:
        roe = {"profile": str(profile), "seed": 5}

    cfg = settings_from_hf_config(Cfg)
    assert (cfg.num_samples, cfg.tau, cfg.seed) == (8, (0.0, 0.4, 0.2, 0.0), 5)
    Cfg.roe = {"profile": str(tmp_path / "missing.json")}
    with pytest.raises(RoESettingsError, match="^roe: profile not found"):
        settings_from_hf_config(Cfg)

    class Plain:
        pass

    assert settings_from_hf_config(Plain) is None  # no `roe` key: the plugin stays out of the way


def test_every_registered_architecture_is_ported_or_refused():
    """Walk vLLM's model registry (its own classes and its Transformers backend): with `roe` set, every
    architecture vLLM can resolve to either is one the plugin ports (registered to its RoE class) or stops vLLM
    at start with one line, through the gate on the registry's `inspect_model_cls`."""
    from types import SimpleNamespace

    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _TRANSFORMERS_BACKEND_MODELS

    import roe.vllm
    from roe.vllm import SUPPORTED, RoESettingsError, gate

    roe.vllm.register()
    assert getattr(ModelRegistry.inspect_model_cls, "_roe_gate", False)  # vLLM's own registry is gated
    archs = set(ModelRegistry.get_supported_archs())
    assert len(archs) > 300 and set(_TRANSFORMERS_BACKEND_MODELS) <= archs
    for arch in SUPPORTED:
        assert ModelRegistry.models[arch].module_name == "roe.vllm.model", arch
    refused = 0
    for arch in sorted(archs):
        fake = SimpleNamespace(inspect_model_cls=lambda archs, cfg, arch=arch: ("info", arch))
        gate.install(fake)  # the same wrapper, on a registry that resolves to this architecture
        with_roe = SimpleNamespace(hf_config=SimpleNamespace(roe={"num_samples": 8, "tau": 0.3}))
        without = SimpleNamespace(hf_config=SimpleNamespace())
        assert fake.inspect_model_cls([arch], without) == ("info", arch)  # no `roe`: vLLM's resolution as is
        if arch in SUPPORTED:
            assert fake.inspect_model_cls([arch], with_roe) == ("info", arch)
            continue
        with pytest.raises(RoESettingsError) as info:
            fake.inspect_model_cls([arch], with_roe)
        msg = str(info.value)
        assert msg.startswith("roe: ") and arch in msg and "\n" not in msg and len(msg) < 200, msg
        refused += 1
    assert refused == len(archs) - len(SUPPORTED)


# MoE families vLLM runs natively or through its Transformers backend, which ran without RoE before the gate
# (config-only checkpoints: the refusal comes while vLLM builds its config, before any weight is read)
UNPORTED = [
    ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", {"moe_num_experts": 8, "moe_k": 2}),
    ("flex_olmo", "FlexOlmoForCausalLM", {}),  # vLLM's Transformers backend
]


@pytest.mark.parametrize("model_type,arch,extra", UNPORTED, ids=[u[0] for u in UNPORTED])
def test_unported_moe_refused_at_start(tmp_path, model_type, arch, extra):
    from checkpoints import tiny_tokenizer
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, **extra)
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(Exception) as info:
        llm = start_llm(str(tmp_path), roe={"num_samples": 8, "tau": 0.3})
        stop_llm(llm)
    lines = [m for m in _messages(info.value) if m.startswith("roe:")]
    assert lines and "does not support" in lines[0] and "\n" not in lines[0], _messages(info.value)
