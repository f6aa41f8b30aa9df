"""Adaptive K in vLLM == the engine's adaptive K, token for token (olmoe, float32, greedy, K = 8, tau 0.5,
entropy threshold 2.4 nats: about the median clean entropy of this checkpoint's tokens, so the gate is on for
some tokens and off for others): several prompts at once, and requests arriving while others decode (the gates
follow the requests through vLLM's batch). Deployments adaptive K cannot run exactly are refused at start."""

import pytest

from conftest import engine_reference, start_llm, stop_llm
from test_vllm_errors import _messages
from test_vllm_roe import ARRIVALS, LOGPROB_TOL, NEW, PROMPTS, ROE, _continuous, _greedy

ADAPTIVE = {**ROE, "adaptive_metric": "entropy", "adaptive_threshold": 2.4}
NO_PREFIX = dict(enable_prefix_caching=False)


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def adaptive_runs(checkpoint, tmp_path_factory):
    path = checkpoint("olmoe")
    arrivals = [p for _, p, _ in ARRIVALS]
    jobs = [{"path": path, "roe": {**ADAPTIVE, "cache": "clean"}, "prompts": PROMPTS, "max_new_tokens": NEW},
            {"path": path, "roe": {**ADAPTIVE, "cache": "clean"}, "prompts": arrivals, "max_new_tokens": NEW},
            {"path": path, "roe": {**ROE, "cache": "clean"}, "prompts": PROMPTS, "max_new_tokens": NEW}]
    engine, engine_arrivals, fixed = engine_reference(jobs, tmp_path_factory.mktemp("adaptive"))
    r = {"engine": engine, "engine_arrivals": engine_arrivals, "fixed": [x["token_ids"] for x in fixed]}
    llm = start_llm(path, roe=ADAPTIVE, **NO_PREFIX)
    outs = _greedy(llm, PROMPTS, logprobs=0)
    r["roe"] = _tokens(outs)
    r["roe_logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         for o in outs]
    r["continuous"] = _continuous(llm)
    r["alone"] = [_tokens(_greedy(llm, [p]))[0] for p in PROMPTS[:2]]
    stop_llm(llm)
    llm = start_llm(path, **NO_PREFIX)
    r["plain"] = _tokens(_greedy(llm, PROMPTS))
    stop_llm(llm)
    return r


def test_adaptive_matches_engine(adaptive_runs):
    r = adaptive_runs
    assert r["roe"] == [x["token_ids"] for x in r["engine"]]
    worst = max(abs(a - b) for got, x in zip(r["roe_logprobs"], r["engine"]) for a, b in zip(got, x["logprobs"]))
    assert worst < LOGPROB_TOL, worst


def test_adaptive_continuous_batching_and_alone_match_engine(adaptive_runs):
    r = adaptive_runs
    for got, x, (_, _, n) in zip(r["continuous"], r["engine_arrivals"], ARRIVALS):
        assert got == x["token_ids"][:n]
    assert r["alone"] == r["roe"][:2]  # a sequence's gates are its own: alone == batched


def test_adaptive_gate_acts_both_ways(adaptive_runs):
    """Neither always on (it would be fixed K) nor always off (the base model): the engine's reference shows the
    same, so this is the checkpoint and threshold, and vLLM's tokens follow it."""
    r = adaptive_runs
    assert r["roe"] != r["fixed"] and r["roe"] != r["plain"]


def test_adaptive_with_prefix_caching_refused_at_start(checkpoint):
    """A prefix-cache hit can leave one token to compute whose previous clean prediction was never made."""
    with pytest.raises(Exception) as info:
        llm = start_llm(checkpoint("olmoe"), roe=ADAPTIVE, enable_prefix_caching=True)
        stop_llm(llm)  # only reached if vLLM wrongly started
    lines = [m for m in _messages(info.value) if m.startswith("roe:")]
    assert lines and lines[0].startswith("roe: adaptive K in vLLM needs enable_prefix_caching=False"), lines
    assert len(lines[0].splitlines()) == 1
