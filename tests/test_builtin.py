"""The shipped built-in family: real checkpoints, compact, trained, with a RoE profile."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from roe import RoEConfig, RosterOfExperts, builtin_path, tasks
from roe.builtin import SIZES
from roe.evaluate import eval_math


def test_family_is_compact_and_loads_with_transformers():
    total = 0
    params = []
    for size in SIZES:
        path = builtin_path(size)
        weights = path / "model.safetensors"
        assert weights.stat().st_size < 16 * 2**20
        total += weights.stat().st_size
        model = AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == "OlmoeForCausalLM" and model.config.num_experts >= 8
        params.append(sum(p.numel() for p in model.parameters()))
    assert total < 40 * 2**20
    assert params == sorted(params) and params[-1] > 3 * params[0]


def test_builtin_uses_its_profile():
    roster = RosterOfExperts.from_pretrained("builtin")
    profile = RoEConfig.from_profile(builtin_path("s") / "roe_profile.json")
    assert roster.config == profile and roster.config.num_samples > 1 and any(t > 0 for t in roster.taus)
    # the checkpoint's own dtype unless told (dtype="auto", as transformers and lm-eval load it)
    assert roster.model.dtype == roster.model.config.dtype == torch.bfloat16
    assert RosterOfExperts.from_pretrained("builtin", dtype="float32").model.dtype.itemsize == 4


@pytest.fixture(scope="module")
def builtin_s():
    return RosterOfExperts.from_pretrained("builtin:s", roe=RoEConfig(num_samples=1, tau=0.0), dtype="float32")


def test_default_model_solves_math(builtin_s):
    items = [e for i, e in enumerate(tasks.examples("math", "test", 36)) if i % 3 != 2][:16]  # seen templates
    assert eval_math(builtin_s, items).value >= 0.6


def test_roe_on_builtin_changes_but_stays_close(builtin_s):
    text = tasks.ppl_texts("validation", 6)
    base = builtin_s.perplexity(text)
    roe = builtin_s.with_config(num_samples=4, tau=[0, 0.3, 0.3, 0]).perplexity(text)
    assert roe != base and abs(roe - base) / base < 0.05
