"""The lm-eval `roe` model in-process: dtype as lm-eval's `hf` reads it, and generate_until batching."""

from types import SimpleNamespace

import pytest
import torch

from roe import builtin_path

harness = pytest.importorskip("roe.harness")


def test_dtype_follows_hf_conventions():
    path = str(builtin_path("s"))  # a bfloat16 checkpoint
    assert harness.RoELM(pretrained=path, num_samples=1).roster.model.dtype == torch.bfloat16  # auto: the file's
    assert harness.RoELM(pretrained=path, dtype="float32").roster.model.dtype == torch.float32
    lm = harness.RoELM(pretrained=path, dtype="bfloat16", compile="off")
    assert lm.roster.model.dtype == torch.bfloat16 and lm.roster.compile == "off"
    info = lm.get_model_info()
    assert info["model_dtype"] == "torch.bfloat16" and info["model_num_parameters"] > 0
    with pytest.raises(ValueError, match="model_args dtype .float33. is not supported: use auto"):
        harness.RoELM(pretrained=path, dtype="float33")


def test_generate_until_batches_by_generation_arguments():
    lm = harness.RoELM(pretrained="builtin", num_samples=2, tau=0.3, batch_size=3, dtype="float32")
    a = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    b = {"until": "=", "max_new_tokens": 6, "temperature": 0.0}  # an alias, and greedy without do_sample
    contexts = ["Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:", "x = 2\nprint(x + 3)\n# Output:\n",
                "Question: What is 7 + 5?\nAnswer:", "Question: Ann has 40 coins. She finds 25 more.\nAnswer:",
                "y = 9\nprint(y)\n# Output:\n", "Question: Which is larger, 3 or 41?\nAnswer:", "z = 1\n"]
    gens = [a, b, a, b, a, a, b]
    real = lm.roster.generate
    calls = []

    def spy(prompts, **kw):
        calls.append((list(prompts), kw))
        return real(prompts, **kw)

    lm.roster.generate = spy
    out = lm.generate_until([SimpleNamespace(args=(c, g)) for c, g in zip(contexts, gens)], disable_tqdm=True)
    assert sorted(len(p) for p, _ in calls) == [1, 3, 3]  # a: 4 requests -> 3 + 1, b: 3 -> 3
    for prompts, kw in calls:
        (group,) = {id(gens[contexts.index(p)]) for p in prompts}  # one group of generation arguments per call
        assert kw["max_new_tokens"] == (4 if group == id(a) else 6) and kw["do_sample"] is False
    # in the requests' order, each the string of its prompt generated alone (float32: batching changes nothing)
    alone = [real(c, max_new_tokens=4 if g is a else 6, stop=["\n"] if g is a else ["="])[0]
             for c, g in zip(contexts, gens)]
    assert out == alone
    assert len(set(out)) > 1


def test_unsupported_generation_arguments_are_named():
    lm = harness.RoELM(pretrained="builtin", num_samples=1, dtype="float32")
    with pytest.raises(ValueError, match="not support: num_beams"):
        lm.generate_until([SimpleNamespace(args=("x = 1\n", {"until": ["\n"], "num_beams": 2}))], disable_tqdm=True)
