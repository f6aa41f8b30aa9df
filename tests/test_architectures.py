"""Every MoE model type in the installed transformers is either supported or refused in one line."""

import pytest
from transformers import AutoConfig

from roe import UnsupportedModelError, adapters, supported_architectures

MOE_TYPES = adapters.transformers_moe_types()  # walked from transformers' config mapping, not written by hand


def test_the_walk_finds_the_known_moe_types():
    # a walk that found nothing would pass the test below vacuously
    assert {"olmoe", "mixtral", "deepseek_v3", "gpt_oss", "qwen3_5_moe", "llama4", "dbrx", "switch_transformers"} \
        <= set(MOE_TYPES)
    assert "llama" not in MOE_TYPES and "qwen3" not in MOE_TYPES


def test_every_moe_type_is_supported_or_explicitly_refused():
    unaccounted = []
    for model_type in MOE_TYPES:
        config_class = AutoConfig.for_model(model_type).__class__
        key = adapters.registry_type(config_class())
        supported = model_type in supported_architectures() or key in adapters.ADAPTERS
        refused = model_type in adapters.REFUSED or key in adapters.REFUSED
        if supported == refused:
            unaccounted.append((model_type, key, "both" if supported else "neither"))
    assert not unaccounted, f"MoE types neither supported nor refused (or both): {unaccounted}"


def test_supported_and_refused_are_disjoint():
    assert not set(adapters.ADAPTERS) & set(adapters.REFUSED)


@pytest.mark.parametrize("model_type", [t for t in MOE_TYPES if t not in supported_architectures()])
def test_a_refusal_is_one_short_line_that_names_what_is_missing(model_type):
    config = AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError) as e:
        adapters.check_supported(config)
    message = str(e.value)
    assert "\n" not in message and len(message) < 200, message
    assert f"'{model_type}'" in message and "supported_architectures()" in message
    assert "not a Mixture-of-Experts" not in message  # the expert count is found wherever the config keeps it


@pytest.mark.parametrize("model_type, experts", [("dbrx", 4), ("qwen3_5_moe", 256), ("llama4", 16), ("mixtral", 8)])
def test_the_expert_count_is_read_wherever_the_config_keeps_it(model_type, experts):
    assert adapters.expert_count(AutoConfig.for_model(model_type)) == experts


def test_a_multimodal_checkpoint_is_keyed_by_its_language_model():
    assert adapters.registry_type(AutoConfig.for_model("qwen3_5_moe")) == "qwen3_5_moe_text"
    assert adapters.registry_type(AutoConfig.for_model("llama4")) == "llama4_text"
    assert adapters.registry_type(AutoConfig.for_model("olmoe")) == "olmoe"


def test_the_readme_table_lists_exactly_the_supported_architectures():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- architectures -->")[1].split("<!-- /architectures -->")[0]
    rows = [line.split("|")[1].strip() for line in table.strip().splitlines()[2:]]
    assert rows == sorted(rows), "keep the table sorted by model type"
    assert set(rows) == set(supported_architectures())
    for line in table.strip().splitlines()[2:]:  # every row names a checkpoint, a family and what is perturbed
        assert all(cell.strip() for cell in line.split("|")[1:-1]), line


def test_a_multimodal_checkpoint_loads_whole_and_roe_runs_its_language_model(tiny_path):
    # arch-d: qwen3_vl_moe has no causal-LM class: the image-text model loads (vision tower included) and RoE's
    # routers are its language model's; test_equivalence runs it through the tau = 0 / noise tests like any arch
    from roe import RosterOfExperts

    roster = RosterOfExperts.from_pretrained(tiny_path("qwen3_vl_moe"))
    assert type(roster.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert hasattr(roster.model.model, "visual")
    assert len(roster.routers) == roster.model.config.text_config.num_hidden_layers
    assert {"qwen3_vl_moe", "qwen3_vl_moe_text"} <= set(supported_architectures())
