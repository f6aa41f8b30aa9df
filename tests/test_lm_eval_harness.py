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


def test_bf16_loglikelihoods_are_as_close_to_float32_as_hf():
    """The 40 first built-in choice items (156 choices) in bfloat16: `roe` at K = 1 within at least `hf`'s mean
    distance of the float32 log-likelihoods (measured: roe 0.0588, hf 0.0618 nats; roe keeps its logits in
    float32 when scoring, hf rounds log-softmax to 16 bits). Both errors are mostly the 16-bit model itself."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from roe import tasks

    reqs = [Instance("loglikelihood", {}, (tasks.choice.prompt(ex["question"]), " " + c), i)
            for i, ex in enumerate(tasks.examples("choice", "test", 40)) for c in ex["choices"]]
    path = str(builtin_path("s"))

    def loglik(lm):
        return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]

    ref = loglik(HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=8))
    hf = loglik(HFLM(pretrained=path, dtype="bfloat16", device="cpu", batch_size=8))
    roe = loglik(harness.RoELM(pretrained=path, dtype="bfloat16", num_samples=1, device="cpu"))
    gap = [sum(abs(a - b) for a, b in zip(x, ref)) / len(ref) for x in (hf, roe)]
    assert 0 < gap[1] <= gap[0], gap


def test_no_device_picks_cuda_or_the_cpu_like_hf(monkeypatch):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lm_eval.models.roe")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert harness._device(None) == "cpu"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert harness._device(None) == "cuda" and harness._device("cpu") == "cpu"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(records) == 2 and "no device given" in records[0] and "using cpu" in records[0]
