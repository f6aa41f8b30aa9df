"""The noise is exactly Gumbel-top-k: k experts without replacement from softmax(R / tau)."""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from roe import routing
from roe.config import RoEConfig


class _Router:
    top_k = 2


def _plackett_luce(p: torch.Tensor, order: tuple[int, ...]) -> float:
    """Probability of drawing `order` (in this order) without replacement from p."""
    left, prob = 1.0, 1.0
    for i in order:
        prob *= float(p[i]) / left
        left -= float(p[i])
    return prob


def _draws(source, draws, experts, seed=0):
    """[draws, experts] standard Gumbel noise: from a torch generator, or the engine's counter-based noise."""
    if source == "generator":
        return routing.gumbel((draws, experts), torch.Generator().manual_seed(seed))
    return routing.gumbel_noise(torch.tensor(seed), torch.arange(draws)[:, None], torch.tensor(1), 3, experts)[:, 0]


def _selected_set_frequencies(select, logits, tau, draws, seed=0, source="generator"):
    noise = _draws(source, draws, logits.numel(), seed) * tau
    _, idx = select(_Router(), logits.expand(draws, -1), noise)
    counts = {}
    for row in idx.sort(dim=-1).values.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def _expected_set_probs(logits, tau, k=2):
    p = torch.softmax(logits.double() / tau, dim=-1)
    return {s: sum(_plackett_luce(p, o) for o in itertools.permutations(s)) for s in itertools.combinations(range(len(p)), k)}


LOGITS = torch.tensor([1.2, 0.4, -0.3, 0.0, -1.0])


@pytest.mark.parametrize("source", ["generator", "engine"])
@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_expert_sets_follow_sampling_without_replacement(tau, source):
    draws = 40_000
    counts = _selected_set_frequencies(lambda r, l, n: routing.softmax_topk(r, l, n, True), LOGITS, tau, draws,
                                       source=source)
    expected = _expected_set_probs(LOGITS, tau)
    keys = [s for s, q in expected.items() if q * draws >= 5]  # chi-square needs expected counts >= 5
    rest = 1 - sum(expected[s] for s in keys)
    obs = [counts.get(s, 0) for s in keys] + [draws - sum(counts.get(s, 0) for s in keys)]
    exp = [expected[s] * draws for s in keys] + [rest * draws]
    assert chisquare(obs, exp).pvalue > 1e-3


def test_chi_square_catches_noise_on_probabilities():
    """The same test rejects a plausible wrong formula: Gumbel noise added to the probabilities."""
    def wrong(router, logits, noise):
        probs = torch.softmax(logits, -1)
        return probs, torch.topk(probs + noise, router.top_k, dim=-1).indices

    draws, tau = 40_000, 0.3
    counts = _selected_set_frequencies(wrong, LOGITS, tau, draws)
    expected = _expected_set_probs(LOGITS, tau)
    keys = [s for s, q in expected.items() if q * draws >= 5]
    rest = 1 - sum(expected[s] for s in keys)
    obs = [counts.get(s, 0) for s in keys] + [draws - sum(counts.get(s, 0) for s in keys)]
    exp = [expected[s] * draws for s in keys] + [rest * draws]
    assert chisquare(obs, exp).pvalue < 1e-6


def test_weights_are_the_models_own_for_the_chosen_experts():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    noise = torch.tensor([[0.0, 0.0, 5.0, 0.0]])  # forces expert 2 in
    w, idx = routing.softmax_topk(_Router(), logits, noise, normalize=False)
    probs = torch.softmax(logits, -1)
    assert sorted(idx[0].tolist()) == [0, 2]
    torch.testing.assert_close(w, probs.gather(-1, idx))
    w, idx = routing.topk_softmax(_Router(), logits, noise)
    torch.testing.assert_close(w, torch.softmax(logits.gather(-1, idx), -1))


def test_noise_is_keyed_by_seed_position_sample_and_layer():
    seed, pos, sample = torch.tensor(7), torch.tensor([3, 4, 5])[:, None], torch.arange(3)[None, :]
    a = routing.gumbel_noise(seed, pos, sample, 2, 4)  # [3 positions, 3 samples, 4 experts]
    b = routing.gumbel_noise(seed, torch.tensor([[5]]), sample, 2, 4)
    assert torch.equal(a[2:], b)  # same key -> same draw, however it is batched
    assert not torch.equal(a, routing.gumbel_noise(torch.tensor(8), pos, sample, 2, 4))
    assert not torch.equal(a, routing.gumbel_noise(seed, pos, sample, 3, 4))  # independent across layers
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0, 0], a[0, 1])  # ... positions and samples
    ref = [[[routing.python_gumbel(7, p, k, 2, e) for e in range(4)] for k in range(3)] for p in (3, 4, 5)]
    assert torch.equal(a.double(), torch.tensor(ref, dtype=torch.float64))  # exact: integers, then a power of 2
    many = routing.gumbel_noise(seed, torch.arange(2000)[:, None], sample, 0, 64)
    assert abs(float(many.mean()) - 0.5772) < 0.01 and abs(float(many.var()) - math.pi**2 / 6) < 0.03


def test_overflow_free_32_bit_multiply_is_the_modular_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**32, (10_000,), generator=g)
    for c in (*routing._LOWBIAS, routing._GAMMA32, 2**31 - 1, 1):
        expected = torch.tensor([v * c % 2**32 for v in x.tolist()])
        assert torch.equal(routing._mul32(x, c), expected)


def test_fixed_point_transform_is_the_gumbel_inverse_cdf():
    """32-bit uniforms u = (b + 0.5) / 2**32 map to -log(-log(u)) within 3e-6 in the bulk and 0.06 in the tails
    (the outermost 2**-24 of each tail aside), monotonically: an inverse CDF, in integers."""
    b = torch.cat([torch.arange(0, 2**32, 4099), torch.arange(0, 2**20), torch.arange(2**32 - 2**20, 2**32)])
    table = routing.gumbel_table("cpu")
    got = routing._fixed_gumbel(b, lambda i: table[i]).double() * 2.0**-19
    u = (b.double() + 0.5) * 2.0**-32
    err = (got - (-torch.log(-torch.log(u)))).abs()
    assert float(err[(u > 2**-8) & (u < 1 - 2**-8)].max()) < 3e-6
    assert float(err[(u > 2**-24) & (u < 1 - 2**-24)].max()) < 0.06
    assert torch.equal(got.sort().values, got[u.argsort()])


def test_gumbel_moments():
    g = routing.gumbel((200_000,), torch.Generator().manual_seed(1))
    assert abs(float(g.mean()) - 0.5772) < 0.01
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.03


def test_layer_taus():
    assert routing.layer_taus(0.3, 1, 5) == [0, 0.3, 0.3, 0.3, 0]
    assert routing.layer_taus(0.3, 0, 2) == [0.3, 0.3]
    assert routing.layer_taus(0.0, 3, 2) == [0, 0]
    assert routing.layer_taus([0.1, 0.2], 1, 2) == [0.1, 0.2]
    with pytest.raises(ValueError, match="one value per MoE layer"):
        routing.layer_taus([0.1, 0.2, 0.3], 1, 2)
    with pytest.raises(ValueError, match="leaves no noisy layer"):
        routing.layer_taus(0.3, 2, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=2.5), "num_samples"),
        (dict(tau=-0.1), "tau must be >= 0"),
        (dict(tau=[0.1, -1.0]), "tau must be >= 0"),
        (dict(tau=float("nan")), "finite"),
        (dict(tau="0.3"), "tau must be a number"),
        (dict(tau=[]), "empty"),
        (dict(skip_layers=-1), "skip_layers"),
        (dict(aggregate="vote"), "aggregate must be one of"),
        (dict(cache="paged"), "cache must be one of"),
        (dict(seed=None), "seed"),
        (dict(seed=-1), "seed must be an integer in \\[0, 2\\*\\*63\\), got -1"),
        (dict(seed=2**63), "seed must be an integer in \\[0, 2\\*\\*63\\)"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoEConfig(**kwargs)


def test_config_replace_and_profile(tmp_path):
    cfg = RoEConfig().replace(num_samples=16, tau=[0.1, 0.2])
    assert cfg.num_samples == 16 and cfg.tau == (0.1, 0.2)
    with pytest.raises(ValueError, match="unknown RoE setting"):
        cfg.replace(temperature=2)
    p = tmp_path / "p.json"
    p.write_text('{"num_samples": 4, "tau": [0, 0.2, 0], "objective": "ppl"}')
    loaded = RoEConfig.from_profile(p, seed=3)
    assert loaded.num_samples == 4 and loaded.tau == (0, 0.2, 0) and loaded.seed == 3
    assert loaded.extra["objective"] == "ppl"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RoEConfig.from_profile(p)


# --- DeepSeek-like families (arch-c) ---


def _deepseek_v2_router(method, groups=4, topk_group=2):
    from transformers import AutoConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = AutoConfig.for_model("deepseek_v2", hidden_size=16, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=groups, topk_group=topk_group, topk_method=method, routed_scaling_factor=1.5)
    router = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    return router


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_group_limited_without_noise_is_deepseek_v2s_router(method):
    router = _deepseek_v2_router(method)
    hidden = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    logits, weights, idx = router(hidden)
    w, i = routing.softmax_group_limited(router, logits, torch.zeros_like(logits))
    order, mine = idx.sort(-1), i.sort(-1)
    assert torch.equal(order.values, mine.values)
    torch.testing.assert_close(weights.gather(-1, order.indices), w.gather(-1, mine.indices))
    # noise large enough moves the choice; the group limit holds on the perturbed scores
    noise = torch.zeros_like(logits)
    noise[:, 7] = 50.0
    _, i = routing.softmax_group_limited(router, logits, noise)
    assert (i == 7).any(-1).all()


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_group_limited_is_gumbel_top_k(method):
    """One group kept of one (the group limit keeps every expert): the choice is Gumbel-top-k of the logits."""
    router = _deepseek_v2_router(method, groups=1, topk_group=1)
    logits = torch.cat([LOGITS, torch.tensor([-2.0, 0.7, -0.5])])
    draws, tau = 40_000, 0.7
    noise = _draws("engine", draws, logits.numel()) * tau
    _, idx = routing.softmax_group_limited(router, logits.expand(draws, -1), noise)
    counts = {}
    for row in idx.sort(dim=-1).values.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    expected = _expected_set_probs(logits, tau)
    keys = [s for s, q in expected.items() if q * draws >= 5]
    rest = 1 - sum(expected[s] for s in keys)
    obs = [counts.get(s, 0) for s in keys] + [draws - sum(counts.get(s, 0) for s in keys)]
    exp = [expected[s] * draws for s in keys] + [rest * draws]
    assert chisquare(obs, exp).pvalue > 1e-3


def test_biased_logit_topk_sigmoid_without_noise_is_kolibri1s_router():
    from transformers import AutoConfig
    from transformers.models.kolibri1.modeling_kolibri1 import Kolibri1TopKRouter

    for norm in (True, False):
        cfg = AutoConfig.for_model("kolibri1", hidden_size=16, num_attention_heads=4, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=norm)
        router = Kolibri1TopKRouter(cfg)
        g = torch.Generator().manual_seed(0)
        torch.nn.init.normal_(router.weight, generator=g)
        router.e_score_correction_bias.normal_(generator=g)
        logits, weights, idx = router(torch.randn(64, 16, generator=g))
        w, i = routing.biased_logit_topk_sigmoid(router, logits, torch.zeros_like(logits))
        assert torch.equal(i, idx)
        torch.testing.assert_close(w, weights)


def test_biased_logit_topk_sigmoid_is_gumbel_top_k():
    """The ranked quantity is R + bias: its choice is Gumbel-top-k of R + bias."""
    router = _Router()
    bias = torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4])
    router.e_score_correction_bias, router.norm_topk_prob = bias, True
    draws, tau = 40_000, 0.7
    noise = _draws("engine", draws, LOGITS.numel()) * tau
    _, idx = routing.biased_logit_topk_sigmoid(router, LOGITS.expand(draws, -1), noise)
    counts = {}
    for row in idx.sort(dim=-1).values.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    expected = _expected_set_probs(LOGITS + bias, tau)
    keys = [s for s, q in expected.items() if q * draws >= 5]
    rest = 1 - sum(expected[s] for s in keys)
    obs = [counts.get(s, 0) for s in keys] + [draws - sum(counts.get(s, 0) for s in keys)]
    exp = [expected[s] * draws for s in keys] + [rest * draws]
    assert chisquare(obs, exp).pvalue > 1e-3
