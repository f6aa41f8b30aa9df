"""Hybrid MoEs (recurrent / convolution layers beside attention): the clean cache's states (src/roe/state.py)
against an independent reference that has no cache at all."""

from functools import lru_cache

import pytest
import torch

from roe import RoEConfig, RosterOfExperts
from roe.adapters import ACTIVE, RoutingNoise
from roe.engine import aggregate
from roe.routing import python_gumbel
from tiny import HYBRIDS, save_tiny

K, TAU, SEED, STEPS = 4, 0.8, 5, 4
PROMPTS = ["The cat sat", "2+2=4; 3+3"]  # different lengths: left padding in the batch


@lru_cache(maxsize=None)
def _gumbel(position: int, sample: int, layer: int, experts: int) -> torch.Tensor:
    return torch.tensor([python_gumbel(SEED, position, sample, layer, e) for e in range(experts)])


def _noise(roster, n: int, noisy_positions) -> list:
    """noise[k][m]: tau * Gumbel [n, E] of sample k at MoE layer m, from the plain-Python reference hash, zero
    outside `noisy_positions` (None: a clean layer or the clean sample)."""
    E = max(roster.num_experts)
    out = []
    for k in range(K):
        layers = []
        for m, tau in enumerate(roster.taus):
            if k == 0 or tau == 0:
                layers.append(None)
                continue
            g = torch.zeros(n, E)
            for p in noisy_positions:
                g[p] = _gumbel(p, k, m, E)
            layers.append(g[:, : roster.num_experts[m]] * tau)
        out.append(layers)
    return out


def reference_next_logprobs(roster, tokens: list[int], cache: str) -> torch.Tensor:
    """Next-token log-probs after `tokens`: one forward of the whole prefix per sample, with no cache (the K
    samples as K independent rows of one plain forward, each with its own noise).

    clean: only the last position is routed noisily (every earlier position is the clean model's history, in
    every layer, recurrent state included); full: every position is routed with the sample's noise."""
    n = len(tokens)
    noisy = [n - 1] if cache == "clean" else list(range(n))
    per_sample = _noise(roster, n, noisy)  # [K][L] of [n, E] or None
    per_layer = []
    for m in range(len(roster.taus)):
        if per_sample[-1][m] is None:
            per_layer.append(None)
        else:
            zeros = torch.zeros_like(per_sample[-1][m])
            per_layer.append(torch.cat([zeros if s[m] is None else s[m] for s in per_sample]))  # [K*n, E]
    rows = torch.zeros(K, n, 1, dtype=torch.bool)
    rows[1:, noisy] = True
    token = ACTIVE.set(RoutingNoise(per_layer, rows.reshape(K * n, 1)))
    try:
        with torch.no_grad():
            logits = roster.model(torch.tensor([tokens] * K)).logits[:, -1]  # [K, V]
    finally:
        ACTIVE.reset(token)
    return aggregate(logits[None], roster.config.aggregate)[0]


# every hybrid under the clean cache; the full cache (the model's own caches, K rows) on one of them, to bound test time
CASES = [(arch, "clean") for arch in HYBRIDS] + [("qwen3_next", "full"), ("jamba", "full")]


@pytest.mark.parametrize("arch, cache", CASES)
def test_hybrid_engine_matches_a_cacheless_reference(arch, cache, tiny_path):
    """Generation (batched, left-padded, decode steps) and teacher-forced scoring (chunks of K rows) against
    full-prefix forwards. skip_layers=1: the first (recurrent) layer is shared by the K samples."""
    roster = RosterOfExperts.from_pretrained(
        tiny_path(arch), roe=RoEConfig(num_samples=K, tau=TAU, skip_layers=1, cache=cache, seed=SEED))
    roster.eos_token_ids = set()
    got = roster.generate_completions(PROMPTS, max_new_tokens=STEPS)
    for prompt, completion in zip(PROMPTS, got):
        tokens = roster.tokenizer(prompt).input_ids
        steps = []
        for _ in range(STEPS):
            steps.append(reference_next_logprobs(roster, tokens, cache))
            tokens = tokens + [int(steps[-1].argmax())]
        assert completion.token_ids == tokens[-STEPS:]
        ctx = roster.tokenizer(prompt).input_ids
        (scored,) = roster.token_logprobs([(ctx, completion.token_ids)])
        expected = torch.stack([s[t] for s, t in zip(steps, completion.token_ids)])
        torch.testing.assert_close(scored, expected, atol=1e-4, rtol=1e-4)
    # the noise is on: the noisy samples change the prediction
    tau0 = roster.with_config(tau=0.0).generate_completions(PROMPTS, max_new_tokens=STEPS)
    ctx = roster.tokenizer(PROMPTS[0]).input_ids
    assert (roster.token_logprobs([(ctx, got[0].token_ids)])[0]
            - roster.with_config(tau=0.0).token_logprobs([(ctx, got[0].token_ids)])[0]).abs().max() > 1e-3
    del tau0


@pytest.mark.parametrize("arch", HYBRIDS)
def test_all_experts_chosen_gives_the_models_own_tokens(arch, tmp_path):
    """top_k = E: the noisy choice is the clean one whatever the noise, so RoE's noisy path (tau 5, K 4) gives the
    model's own greedy tokens and scores, both caches."""
    import tiny

    overrides = dict(tiny.ARCHS[arch], num_experts_per_tok=8)
    saved = tiny.ARCHS[arch]
    tiny.ARCHS[arch] = overrides
    try:
        path = save_tiny(arch, tmp_path / arch)
    finally:
        tiny.ARCHS[arch] = saved
    base = RosterOfExperts.from_pretrained(path, roe=RoEConfig(num_samples=1, tau=0.0))
    model, tok = base.model, base.tokenizer
    want = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=STEPS, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
        want.append(out[0, ids.shape[1]:].tolist())
    for cache in ("clean", "full"):
        roster = base.with_config(num_samples=K, tau=5.0, skip_layers=0, cache=cache)
        roster.eos_token_ids = set()
        run = roster.new_pass([0], record_experts=True)
        ids = tok(PROMPTS[0]).input_ids
        run.prefill(torch.tensor([ids[:-1]]), torch.ones(1, len(ids) - 1, dtype=torch.bool))
        run.forward(torch.tensor([ids[-1:]]))
        assert all(c is not None and c.shape == (K, 8) for c in run.chosen[-1])  # the noisy path ran
        assert [c.token_ids for c in roster.generate_completions(PROMPTS, max_new_tokens=STEPS)] == want, cache
        assert roster.score(["The cat"], [" sat on"]) == pytest.approx(base.score(["The cat"], [" sat on"]), abs=1e-4)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_stored_state_does_not_grow_with_k(arch, tiny_path):
    """The clean cache stores one state per prompt (keys/values plus recurrent and convolution states) for any K;
    the full cache one per sample from the first noisy layer on."""
    roster = RosterOfExperts.from_pretrained(tiny_path(arch), roe=RoEConfig(tau=0.5, skip_layers=0))
    ids = torch.tensor([roster.tokenizer("hello there").input_ids])
    sizes = {}
    for cache in ("clean", "full"):
        for k in (1, 8):
            run = roster.with_config(num_samples=k, cache=cache).new_pass([0])
            run.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool))
            for _ in range(3):
                run.forward(ids[:, -1:])
            sizes[cache, k] = run.kv_cache_bytes()
            if cache == "clean":
                assert run.cache.live and run.cache.state_bytes() > 0
    assert sizes["clean", 8] == sizes["clean", 1] > 0
    assert sizes["full", 8] == 8 * sizes["full", 1]  # skip_layers=0: every layer has K histories


@pytest.mark.parametrize("first", ["full_attention", "linear_attention"])
def test_minimax_layouts_against_the_full_forward(first, tmp_path):
    """MiniMax's cached decode against its own full forward, per layout. transformers 5.24 infers a decode step's
    position from the cache's layer 0: with a linear-attention layer 0 that layer holds no keys, the position is
    taken as 0 and its own decode (no position_ids, as `generate` runs it) is off by ~5 in the logits; with a
    full-attention layer 0 it is right. Given explicit positions (as RoE always passes them) both layouts agree,
    and so does RoE's clean cache at tau = 0. (The tiny checkpoint of tests/tiny.py starts with full attention,
    so test_equivalence's comparison with `generate` holds.)"""
    import tiny
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    saved = tiny.ARCHS["minimax"]
    tiny.ARCHS["minimax"] = dict(saved, layer_types=[first, "linear_attention", "full_attention", "linear_attention"])
    try:
        path = save_tiny("minimax", tmp_path / "minimax")
    finally:
        tiny.ARCHS["minimax"] = saved
    roster = RosterOfExperts.from_pretrained(path, roe=RoEConfig(num_samples=K, tau=0.0))
    model = roster.model
    ids = torch.tensor([roster.tokenizer("The cat sat").input_ids])
    n = ids.shape[1]

    def own_decode(**position):
        cache = MiniMaxCache()
        with torch.no_grad():
            model(ids[:, :-1], cache=cache, use_cache=True)
            return model(ids[:, -1:], cache=cache, use_cache=True, **position).logits[0, -1]

    with torch.no_grad():
        full = model(ids).logits[0, -1]
    torch.testing.assert_close(own_decode(position_ids=torch.tensor([[n - 1]])), full, atol=1e-4, rtol=1e-4)
    if first == "full_attention":
        torch.testing.assert_close(own_decode(), full, atol=1e-4, rtol=1e-4)
    for cache in ("clean", "full"):
        run = roster.with_config(cache=cache).new_pass([0])
        run.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool))
        torch.testing.assert_close(run.forward(ids[:, -1:])[0, 0, -1], full, atol=1e-4, rtol=1e-4)


def test_clean_cache_on_a_hybrid_refuses_an_older_transformers_in_one_line(tiny_path, monkeypatch):
    """Before Cache.get_conv_state (transformers 5.19 here in the vLLM venv), hybrid layers reach into
    cache.layers[i] themselves: the clean cache cannot answer them, so it refuses instead of crashing deep inside."""
    from transformers import Cache

    from roe.adapters import UnsupportedModelError

    roster = RosterOfExperts.from_pretrained(tiny_path("qwen3_next"), roe=RoEConfig(num_samples=2, tau=0.5))
    monkeypatch.delattr(Cache, "get_conv_state")
    with pytest.raises(UnsupportedModelError, match="Cache.get_conv_state") as e:
        roster.new_pass([0])
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
    roster.with_config(cache="full").new_pass([0])  # the full cache uses the model's own caches
