"""Qwen3-Next (Gated DeltaNet linear attention + full attention) in vLLM with RoE == the project's engine.

vLLM's CPU Gated DeltaNet runs only in bfloat16 (head dim 128), so vLLM runs in bfloat16 and is compared with
the engine in float32: they differ by bf16 rounding, and a flipped near-tie ends the comparison of a sequence;
the checks are on the common prefix, as in test_vllm_mla.py. The strongest check is internal: tau -> 0 against
plain vLLM.
"""

import pytest

from conftest import engine_reference, start_llm, stop_llm
from test_vllm_mla import (BF16_MAX, BF16_MEAN, BF16_MIN_SHARED, TINY_MEAN, _assert_close_on_common_prefix,
                           _prefix_diffs, _tokens_logprobs)
from test_vllm_roe import ARRIVALS, NEW, PROMPTS, ROE, _continuous, _greedy

ARCH = "qwen3_next"
BF16 = {"dtype": "bfloat16"}
# tau -> 0 vs plain vLLM, per token: measured mean 0.013, max 0.48 on one token (6 prompts x 12 tokens; the same
# prompt alone: max 0.03); the recurrent states carry bf16 rounding forward, so the max is looser than MLA's
TINY_MAX = 1.0


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    path = checkpoint(ARCH)
    roe = {**ROE, "cache": "clean"}
    # the engine in float32: vLLM keeps the recurrent states in float32 and follows transformers' float32 greedy
    # tokens more closely than transformers' bfloat16 run does on this checkpoint
    jobs = [{"path": path, "roe": roe, "prompts": PROMPTS, "max_new_tokens": NEW},
            {"path": path, "roe": roe, "prompts": [p for _, p, _ in ARRIVALS], "max_new_tokens": NEW}]
    r = {"engine": engine_reference(jobs, tmp_path_factory.mktemp("reference"))}
    for name, settings in (("plain", None), ("tau0", {**ROE, "tau": 0.0}),
                           ("tiny", {"num_samples": 8, "tau": 1e-6, "seed": 0})):
        llm = start_llm(path, roe=settings, **BF16)
        r[name] = _tokens_logprobs(_greedy(llm, PROMPTS, logprobs=0))
        stop_llm(llm)
    llm = start_llm(path, roe=ROE, **BF16)
    llm.apply_model(lambda m: setattr(m, "_roe_record", []))
    r["roe"] = _tokens_logprobs(_greedy(llm, PROMPTS, logprobs=0))
    r["record"] = llm.apply_model(lambda m: m._roe_record)[0]
    r["continuous"] = _continuous(llm)
    stop_llm(llm)
    return r


def test_gdn_roe_off_is_plain_vllm(run):
    assert run["tau0"][0] == run["plain"][0]


def test_gdn_noisy_rows_read_the_clean_state(run):
    """tau -> 0: the K-1 noisy rows (each a step from a copy of the clean state) keep RoE's aggregate within
    bf16 rounding of plain vLLM on the common greedy prefix."""
    diffs, shared = _prefix_diffs(*run["plain"], *run["tiny"])
    _assert_close_on_common_prefix(f"{ARCH} bf16 tau->0 vs plain", diffs, shared, len(PROMPTS) * 4, TINY_MEAN,
                                   TINY_MAX)


def test_gdn_roe_matches_engine_on_common_prefix(run):
    """K = 8, tau = 0.5: tokens equal the engine's (float32) up to a flipped near-tie, log-probs close."""
    ref = run["engine"][0]
    toks, lps = run["roe"]
    diffs, shared = _prefix_diffs(toks, lps, [x["token_ids"] for x in ref], [x["logprobs"] for x in ref])
    total = sum(len(t) for t in toks)
    _assert_close_on_common_prefix(f"{ARCH} bf16 RoE vs engine", diffs, shared, BF16_MIN_SHARED * total, BF16_MEAN,
                                   BF16_MAX, total)


def test_gdn_continuous_batching_matches_engine_on_common_prefix(run):
    """Requests arriving while others decode (prefills with states next to decodes) follow the engine."""
    got = run["continuous"]
    want = [x["token_ids"][:n] for x, (_, _, n) in zip(run["engine"][1], ARRIVALS)]
    _, shared = _prefix_diffs(got, [[0.0] * len(t) for t in got], want, [[0.0] * len(t) for t in want])
    print(f"MEASURED {ARCH} bf16 continuous vs engine: {shared}/{sum(len(t) for t in want)} shared tokens")
    assert shared >= BF16_MIN_SHARED * sum(len(t) for t in want), (got, want)


def test_gdn_noise_is_active(run):
    assert run["roe"][0] != run["plain"][0]
    per_layer = {}
    for ordinal, idx in run["record"]:
        per_layer.setdefault(ordinal, set()).update(idx[:7].flatten().tolist())
    assert set(per_layer) == {1, 2}
    assert all(len(s) > 2 for s in per_layer.values()), per_layer
