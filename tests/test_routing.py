"""The noise is exactly Gumbel-top-k: k experts without replacement from softmax(R / tau)."""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from roe import routing
from roe.config import RoEConfig
import tiny


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


def _selected_set_frequencies(select, logits, tau, draws, seed=0, source="generator", router=None):
    """How often each expert set is chosen over `draws` noise draws (the router defaults to a plain one)."""
    noise = _draws(source, draws, logits.numel(), seed) * tau
    _, idx = select(router if router is not None else _Router(), logits.expand(draws, -1), noise)
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
    assert _chi_square_pvalue(counts, _expected_set_probs(LOGITS, tau), draws) > 1e-3


def test_chi_square_catches_noise_on_probabilities():
    """The same test rejects a plausible wrong formula: Gumbel noise added to the probabilities."""
    def wrong(router, logits, noise):
        probs = torch.softmax(logits, -1)
        return probs, torch.topk(probs + noise, router.top_k, dim=-1).indices

    draws, tau = 40_000, 0.3
    counts = _selected_set_frequencies(wrong, LOGITS, tau, draws)
    assert _chi_square_pvalue(counts, _expected_set_probs(LOGITS, tau), draws) < 1e-6


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


# --- arch-a: the router families of Cohere2-MoE, MiniMax-M2 / AFMoE and Phi-3.5-MoE ---


class _FamilyRouter:
    """What the new families read off a router: top-k, Cohere2's selection function, Phi-MoE's jitter."""

    top_k = 2
    norm_topk_prob = True
    router_jitter_noise = 0.01

    def __init__(self, expert_selection_fn="softmax"):
        self.expert_selection_fn = expert_selection_fn


def _zero_bias(select):
    return lambda router, logits, noise: select(router, logits, noise, torch.zeros(logits.shape[-1]))


NEW_FAMILIES = {
    "cohere2_softmax": (routing.topk_softmax_or_sigmoid, "softmax"),
    "cohere2_sigmoid": (routing.topk_softmax_or_sigmoid, "sigmoid"),
    "sigmoid_bias": (_zero_bias(routing.sigmoid_bias_topk), "softmax"),  # with a zero bias: exactly Gumbel-top-k
    "sparsemixer": (routing.sparsemixer_top2, "softmax"),
}


def _chi_square_pvalue(counts, expected, draws):
    keys = [s for s, q in expected.items() if q * draws >= 5]  # chi-square needs expected counts >= 5
    obs, exp = [counts.get(s, 0) for s in keys], [expected[s] * draws for s in keys]
    rest = draws - sum(exp)
    if rest > 1e-6 * draws:  # the rare outcomes, pooled
        obs, exp = obs + [draws - sum(obs)], exp + [rest]
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_new_families_draw_expert_sets_without_replacement(family):
    select, fn = NEW_FAMILIES[family]
    draws, tau = 40_000, 0.5
    counts = _selected_set_frequencies(select, LOGITS, tau, draws, source="engine", router=_FamilyRouter(fn))
    assert _chi_square_pvalue(counts, _expected_set_probs(LOGITS, tau), draws) > 1e-3


def test_sparsemixer_first_choice_then_second_follow_softmax_over_tau():
    """Sparsemixer keeps its order (first expert, then the best of the rest): the ordered pair is a draw without
    replacement from softmax(R / tau), so the first choice alone follows softmax(R / tau)."""
    draws, tau = 40_000, 0.5
    noise = _draws("engine", draws, LOGITS.numel(), seed=1) * tau
    _, idx = routing.sparsemixer_top2(_FamilyRouter(), LOGITS.expand(draws, -1), noise)
    p = torch.softmax(LOGITS.double() / tau, dim=-1)
    first = {(e,): int((idx[:, 0] == e).sum()) for e in range(len(p))}
    assert _chi_square_pvalue(first, {(e,): float(p[e]) for e in range(len(p))}, draws) > 1e-3
    pairs = {}
    for row in idx.tolist():
        pairs[tuple(row)] = pairs.get(tuple(row), 0) + 1
    ordered = {o: _plackett_luce(p, o) for o in itertools.permutations(range(len(p)), 2)}
    assert _chi_square_pvalue(pairs, ordered, draws) > 1e-3


def test_sigmoid_bias_family_ranks_with_the_bias_it_is_given():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # forces expert 3 in, with its clean sigmoid score as weight
    w, idx = routing.sigmoid_bias_topk(_FamilyRouter(), logits, torch.zeros_like(logits), bias)
    assert sorted(idx[0].tolist()) == [0, 3]
    scores = logits.sigmoid().gather(-1, idx)
    torch.testing.assert_close(w, scores / scores.sum(-1, keepdim=True))


def _router_call(model, router):
    """Run the model on 16 random tokens and return a router's call arguments and (logits, weights, indices)
    (the whole model, not the MoE block: Gemma 4's router sits on the decoder layer beside its attention)."""
    seen = {}
    hook = router.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, tiny.VOCAB, (1, 16), generator=torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    out = seen["out"]
    return seen["args"], (out[::-1] if not out[0].is_floating_point() else out)  # old GraniteMoe: index first


def _tiny_model(arch):
    if arch != "cohere2_moe-sigmoid":
        return tiny.tiny_model(arch)
    from transformers import AutoConfig, AutoModelForCausalLM  # Cohere2-MoE's other router variant
    cfg = AutoConfig.for_model("cohere2_moe", **{**tiny.COMMON, **tiny.ARCHS["cohere2_moe"],
                                                 "expert_selection_fn": "sigmoid"})
    return tiny.init_decisive(AutoModelForCausalLM.from_config(cfg), 0)


def _own_output_call(block, router, adapter, hidden):
    """The output where the adapter reads the model's choice (the router's, or the experts' (args, kwargs))."""
    seen = {}
    if adapter.output.on_experts:
        hook = block.experts.register_forward_pre_hook(lambda m, a, kw: seen.update(out=(a, kw)), with_kwargs=True)
    else:
        hook = router.register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        with torch.no_grad():
            block(hidden)
    finally:
        hook.remove()
    return seen["out"]


def _assert_same_leaves(got, want):
    if isinstance(got, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.is_floating_point():
            torch.testing.assert_close(got, want)
        else:
            assert torch.equal(got, want)
    elif isinstance(got, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same_leaves(g, w)
    elif isinstance(got, dict):
        assert got.keys() == want.keys()
        for k in got:
            _assert_same_leaves(got[k], want[k])
    else:
        assert got == want


@pytest.mark.parametrize("arch", sorted(tiny.ARCHS) + ["cohere2_moe-sigmoid"])
def test_select_without_noise_is_the_models_own_router(arch):
    """With zero noise, every registered select gives the experts and weights of the model's own router."""
    from roe.adapters import TRIPLE, _attribute_path, _decoder_layers, adapter_for, find_moe_layers

    model = _tiny_model(arch)
    adapter = adapter_for(model)
    layer, router = find_moe_layers(model)[0]
    block = _attribute_path(_decoder_layers(model)[layer], adapter.block_attr)  # dotted, or "": the layer itself
    hidden = torch.randn(1, 16, tiny.COMMON["hidden_size"], generator=torch.Generator().manual_seed(0))
    if adapter.output is not TRIPLE:  # arch-b: a router output of its own layout; the zero-noise choice written
        out = _own_output_call(block, router, adapter, hidden)  # into every row must give the model's own output
        flat = adapter.output.logits(router, out)
        w, i = adapter.select(router, flat, torch.zeros_like(flat, dtype=torch.float32))
        rows = torch.ones(flat.shape[0], 1, dtype=torch.bool)
        _assert_same_leaves(adapter.output.write(router, out, rows, w, i), out if not adapter.output.on_experts
                            else (out[0], {}))
        return
    args, (logits, weights, idx) = _router_call(model, router)
    flat = logits.reshape(-1, logits.shape[-1])
    extra = args[1:] if adapter.router_args else ()
    w, i = adapter.select(router, flat, torch.zeros_like(flat, dtype=torch.float32), *extra)
    order, mine = idx.sort(-1), i.sort(-1)
    assert torch.equal(order.values, mine.values)
    torch.testing.assert_close(w.gather(-1, mine.indices), weights.float().gather(-1, order.indices))


# arch-b: the router families of llama4_text (top-k then sigmoid), dbrx (softmax, top-k, p-norm) and
# longcat_flash (softmax plus a correction bias, scaled): each ranks R (or a monotone function of it) when its
# bias is zero, so its noisy choice must be Gumbel-top-k of softmax(R / tau)
class _ArchBRouter:
    top_k = 2
    moe_normalize_expert_weights = 1.0
    routed_scaling_factor = 2.5
    e_score_correction_bias = torch.zeros(len(LOGITS))


@pytest.mark.parametrize("family", ["topk_sigmoid", "softmax_topk_pnorm", "softmax_bias_scaled"])
def test_arch_b_families_follow_sampling_without_replacement(family):
    draws, tau = 40_000, 0.7
    counts = _selected_set_frequencies(getattr(routing, family), LOGITS, tau, draws, source="engine",
                                       router=_ArchBRouter())
    assert _chi_square_pvalue(counts, _expected_set_probs(LOGITS, tau), draws) > 1e-3


def test_arch_b_weights_are_the_models_own():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    noise = torch.tensor([[0.0, 0.0, 5.0, 0.0]])  # forces expert 2 in
    router = _ArchBRouter()
    router.e_score_correction_bias = torch.tensor([0.0, 0.0, 0.0, 0.1])
    w, idx = routing.topk_sigmoid(router, logits, noise)
    assert sorted(idx[0].tolist()) == [0, 2]
    torch.testing.assert_close(w, logits.gather(-1, idx).sigmoid())
    probs = torch.softmax(logits, -1)
    for p in (1.0, 2.0, None):
        router.moe_normalize_expert_weights = p
        w, idx = routing.softmax_topk_pnorm(router, logits, noise)
        chosen = probs.gather(-1, idx)
        torch.testing.assert_close(w, chosen if p is None else chosen / chosen.norm(p=p, dim=-1, keepdim=True))
    w, idx = routing.softmax_bias_scaled(router, logits, torch.zeros_like(logits))
    assert sorted(idx[0].tolist()) == [0, 1]  # 0.03 + 0.1 on expert 3 stays below 0.24 on expert 1
    torch.testing.assert_close(w, probs.gather(-1, idx) * 2.5)
    w, idx = routing.softmax_bias_scaled(router, logits, torch.tensor([[0.0, -1.5, 0.0, 0.0]]))
    assert sorted(idx[0].tolist()) == [0, 3]  # the bias counts in the ranking, not in the weights
    torch.testing.assert_close(w, probs.gather(-1, idx) * 2.5)


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
    counts = _selected_set_frequencies(routing.softmax_group_limited, logits, tau, draws, source="engine",
                                       router=router)
    assert _chi_square_pvalue(counts, _expected_set_probs(logits, tau), draws) > 1e-3


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
    counts = _selected_set_frequencies(routing.biased_logit_topk_sigmoid, LOGITS, tau, draws, source="engine",
                                       router=router)
    assert _chi_square_pvalue(counts, _expected_set_probs(LOGITS + bias, tau), draws) > 1e-3
