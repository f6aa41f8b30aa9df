"""Bad input gets a clear error, never a traceback from deep inside torch."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from roe import RoEConfig, RosterOfExperts, UnsupportedModelError, adapters
from tiny import COMMON, tiny_tokenizer


@pytest.fixture(scope="module")
def roster(tiny_path):
    return RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=2, tau=0.3))


def _save(tmp_path, model_type, **extra):
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_dense_model_is_rejected_in_one_line(tmp_path):
    path = _save(tmp_path, "llama")
    with pytest.raises(UnsupportedModelError, match=r"^'llama' is not a Mixture-of-Experts.*supported_architectures\(\)$"):
        RosterOfExperts.from_pretrained(path)


def test_an_moe_type_without_an_adapter_is_rejected_before_its_weights_load(tmp_path, monkeypatch):
    path = _save(tmp_path, "olmoe", num_experts=4, num_experts_per_tok=2)
    monkeypatch.delitem(adapters.ADAPTERS, "olmoe")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(UnsupportedModelError, match=r"^'olmoe' is a Mixture-of-Experts architecture RoE does not"):
        RosterOfExperts.from_pretrained(path)


def test_moe_model_without_moe_layers(tmp_path):
    path = _save(tmp_path, "qwen2_moe", num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 1, 2, 3])
    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        RosterOfExperts.from_pretrained(path)


def test_missing_path():
    with pytest.raises(ValueError, match="cannot load a model config"):
        RosterOfExperts.from_pretrained("/nonexistent/model/dir")


def test_tau_list_of_wrong_length(roster):
    with pytest.raises(ValueError, match="tau has 3 values but the model has 4 MoE layers"):
        roster.with_config(tau=[0.1, 0.2, 0.3])


def test_skip_layers_too_large(roster):
    with pytest.raises(ValueError, match="leaves no noisy layer"):
        roster.with_config(skip_layers=2)


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one(roster, k):
    with pytest.raises(ValueError, match="num_samples"):
        roster.with_config(num_samples=k)


def test_negative_tau(roster):
    with pytest.raises(ValueError, match="tau must be >= 0"):
        roster.with_config(tau=-0.5)


def test_empty_prompt(roster):
    with pytest.raises(ValueError, match="prompt is empty"):
        roster.generate("")
    with pytest.raises(ValueError, match="no prompts"):
        roster.generate([])


def test_prompt_longer_than_context(roster):
    with pytest.raises(ValueError, match="more than the model's context of 128"):
        roster.generate("x" * 200, max_new_tokens=1)
    with pytest.raises(ValueError, match="plus 60 new tokens"):
        roster.generate("x" * 100, max_new_tokens=60)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0), "temperature must be > 0"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(temperature=0.7), "only apply with do_sample=True"),
        (dict(stop=[""]), "stop must be"),
    ],
)
def test_bad_sampling_settings(roster, kwargs, message):
    with pytest.raises(ValueError, match=message):
        roster.generate("abc", **kwargs)


def test_bad_scoring_input(roster):
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        roster.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="continuation is empty"):
        roster.score("a", "")
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        roster.perplexity(["a"])
    with pytest.raises(TypeError, match="must be a string"):
        roster.generate([3])


def test_unknown_builtin_size():
    with pytest.raises(ValueError, match="unknown built-in model size 'xl'"):
        RosterOfExperts.from_pretrained("builtin:xl")
