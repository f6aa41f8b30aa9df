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
    ("gpt_oss", {"num_samples": 8, "tau": 0.3},
     "roe: 'GptOssForCausalLM' is a Mixture-of-Experts architecture the RoE vLLM plugin does not support yet"),
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
