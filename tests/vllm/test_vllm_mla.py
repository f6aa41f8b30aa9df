"""DeepSeek-V2/V3 (multi-head latent attention) in vLLM with RoE == the project's engine.

vLLM's CPU MLA needs the real latent sizes (kv_lora_rank 512 + rope 64) and runs under MLA_VLLM (CPU_MLA
backend, the native rotary embedding). Float32 (CPU_MLA runs it, and there plain vLLM equals transformers token
for token on these checkpoints): RoE's tokens equal the engine's. bfloat16, the served dtype: plain vLLM and
the engine already differ by bf16 rounding (different kernels), so a flipped near-tie ends the comparison of a
sequence; the checks are on the common prefix (see test_vllm_bf16.py), with the tolerances measured below.
"""

import pytest

from checkpoints import MLA_VLLM
from conftest import engine_reference, start_llm, stop_llm
from test_vllm_roe import ARRIVALS, NEW, PROMPTS, ROE, _continuous, _greedy

ARCHS = ["deepseek_v2", "deepseek_v3"]
F32 = {**MLA_VLLM, "dtype": "float32"}
LOGPROB_TOL = 2e-3  # float32, |vLLM - engine| per token (measured: max 9.5e-6 V2, 6.0e-6 V3)
# bfloat16, over the common greedy prefix: tau -> 0 vs plain vLLM (both vLLM; measured mean 0.003, max 0.03) and
# RoE vs the engine in bf16 (measured: V2 59/72 tokens shared, mean 0.025, max 0.09; V3 44/72, mean 0.064,
# max 0.82: transformers' and vLLM's bf16 sigmoid routers round differently and flip near-ties)
TINY_MEAN, TINY_MAX = 0.05, 0.5
BF16_MEAN, BF16_MAX, BF16_MIN_SHARED = 0.1, 1.0, 0.5


def _tokens_logprobs(outs):
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return toks, lps


def _prefix_diffs(a_toks, a_lps, b_toks, b_lps):
    """|logprob difference| per token up to (and including) each sequence's first differing token."""
    diffs, shared = [], 0
    for a, b, la, lb in zip(a_toks, b_toks, a_lps, b_lps):
        for i in range(min(len(a), len(b))):
            if a[i] != b[i]:
                break
            diffs.append(abs(la[i] - lb[i]))
            shared += 1
    return diffs, shared


def _assert_close_on_common_prefix(what, diffs, shared, min_shared, mean_tol, max_tol, total=None):
    """Print the measured prefix comparison and check it: enough shared tokens, mean and max |difference|."""
    mean, top = sum(diffs) / len(diffs), max(diffs)
    print(f"MEASURED {what}: {shared}{'' if total is None else f'/{total}'} shared tokens, mean {mean:.4f}, "
          f"max {top:.4f}")
    assert shared >= min_shared, shared
    assert mean < mean_tol and top < max_tol, (mean, top)


@pytest.fixture(scope="module")
def references(checkpoint, tmp_path_factory):
    jobs = []
    for arch in ARCHS:
        path = checkpoint(arch)
        roe = {**ROE, "cache": "clean"}
        jobs.append({"path": path, "roe": roe, "prompts": PROMPTS, "max_new_tokens": NEW})
        jobs.append({"path": path, "roe": roe, "prompts": [p for _, p, _ in ARRIVALS], "max_new_tokens": NEW})
        jobs.append({"path": path, "roe": roe, "prompts": PROMPTS, "max_new_tokens": NEW, "dtype": "bfloat16"})
    out = engine_reference(jobs, tmp_path_factory.mktemp("reference"))
    return {arch: out[3 * i : 3 * i + 3] for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def runs(checkpoint, references):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = _run(checkpoint(arch), references[arch])
        return cache[arch]

    return get


def _run(path, engine) -> dict:
    r = {"engine": engine}
    llm = start_llm(path, **F32)
    r["plain"] = _tokens_logprobs(_greedy(llm, PROMPTS, logprobs=0))[0]
    stop_llm(llm)
    llm = start_llm(path, roe={**ROE, "tau": 0.0}, **F32)
    r["tau0"] = _tokens_logprobs(_greedy(llm, PROMPTS, logprobs=0))[0]
    stop_llm(llm)
    llm = start_llm(path, roe=ROE, **F32)
    r["backend"] = llm.apply_model(lambda m: {a.attn_backend.get_name() for _, a in m._roe_attn})[0]
    llm.apply_model(lambda m: setattr(m, "_roe_record", []))
    r["roe"], r["roe_lp"] = _tokens_logprobs(_greedy(llm, PROMPTS, logprobs=0))
    r["record"] = llm.apply_model(lambda m: m._roe_record)[0]
    r["continuous"] = _continuous(llm)
    stop_llm(llm)
    for name, roe in (("bf16_plain", None), ("bf16_tiny", {"num_samples": 8, "tau": 1e-6, "seed": 0}),
                      ("bf16_roe", ROE)):
        llm = start_llm(path, roe=roe, **MLA_VLLM)
        r[name] = _tokens_logprobs(_greedy(llm, PROMPTS, logprobs=0))
        stop_llm(llm)
    return r


@pytest.mark.parametrize("arch", ARCHS)
def test_mla_roe_off_is_plain_vllm(runs, arch):
    r = runs(arch)
    assert r["tau0"] == r["plain"]


@pytest.mark.parametrize("arch", ARCHS)
def test_mla_roe_matches_engine(runs, arch):
    """K = 8, tau = 0.5, float32: vLLM's tokens == the engine's, log-probs within LOGPROB_TOL."""
    r = runs(arch)
    ref = r["engine"][0]
    assert r["backend"] == {"CPU_MLA"}
    assert r["roe"] == [x["token_ids"] for x in ref]
    worst = max(abs(a - b) for got, x in zip(r["roe_lp"], ref) for a, b in zip(got, x["logprobs"]))
    print(f"MEASURED {arch} float32 max |logprob diff| {worst:.2e}")  # shown with pytest -s
    assert worst < LOGPROB_TOL, worst


@pytest.mark.parametrize("arch", ARCHS)
def test_mla_continuous_batching_matches_engine(runs, arch):
    r = runs(arch)
    for got, x, (_, _, n) in zip(r["continuous"], r["engine"][1], ARRIVALS):
        assert got == x["token_ids"][:n]


@pytest.mark.parametrize("arch", ARCHS)
def test_mla_noise_is_active(runs, arch):
    r = runs(arch)
    assert r["roe"] != r["plain"]
    per_layer = {}
    for ordinal, idx in r["record"]:
        per_layer.setdefault(ordinal, set()).update(idx[:7].flatten().tolist())
    assert set(per_layer) == {1, 2}  # skip_layers=1 of 4 MoE layers
    assert all(len(s) > 2 for s in per_layer.values()), per_layer


@pytest.mark.parametrize("arch", ARCHS)
def test_mla_bf16_noisy_rows_read_the_latent_cache(runs, arch):
    """bfloat16, tau -> 0: the K-1 noisy rows (latent history read from the cache plus their own) keep RoE's
    aggregate within bf16 rounding of plain vLLM on the common greedy prefix."""
    r = runs(arch)
    diffs, shared = _prefix_diffs(*r["bf16_plain"], *r["bf16_tiny"])
    _assert_close_on_common_prefix(f"{arch} bf16 tau->0 vs plain", diffs, shared, len(PROMPTS) * 4, TINY_MEAN,
                                   TINY_MAX)


@pytest.mark.parametrize("arch", ARCHS)
def test_mla_bf16_roe_matches_engine_on_common_prefix(runs, arch):
    """bfloat16, K = 8, tau = 0.5: tokens equal the engine's (bf16) up to a flipped near-tie, log-probs close."""
    r = runs(arch)
    ref = r["engine"][2]
    toks, lps = r["bf16_roe"]
    diffs, shared = _prefix_diffs(toks, lps, [x["token_ids"] for x in ref], [x["logprobs"] for x in ref])
    total = sum(len(t) for t in toks)
    _assert_close_on_common_prefix(f"{arch} bf16 RoE vs engine", diffs, shared, BF16_MIN_SHARED * total, BF16_MEAN,
                                   BF16_MAX, total)


def test_mla_other_backends_refused_in_one_line():
    """The latent cache is read only where its layout is known (CPU_MLA); AMX_MLA and others refuse at start."""
    import torch

    from roe.vllm.mla import latent_view
    from roe.vllm.settings import RoESettingsError

    class Backend:
        @staticmethod
        def get_name():
            return "AMX_MLA"

    class Attn:
        attn_backend = Backend

    with pytest.raises(RoESettingsError) as info:
        latent_view(Attn(), torch.zeros(1, 16, 576))
    msg = str(info.value)
    assert msg.startswith("roe: ") and "AMX_MLA" in msg and "CPU_MLA" in msg and "\n" not in msg and len(msg) < 200
