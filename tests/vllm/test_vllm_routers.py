"""The noisy-row router families of the vLLM plugin (roe.vllm.routers) against the engine's (roe.routing), on
random logits and noise: the same experts, and weights equal to float32 rounding. The vLLM routers are stand-ins
with the attributes vLLM's CPURouter / GroupedTopKRouter carry (vllm/model_executor/layers/fused_moe/router/)."""

from types import SimpleNamespace

import pytest
import torch

from roe import routing
from roe.vllm import routers
from roe.vllm.settings import RoESettingsError

T, E = 64, 16


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    noise = 0.5 * -torch.log(-torch.log(torch.rand(T, E, generator=g)))
    bias = torch.randn(E, generator=g) * 0.1
    return logits, noise, bias


def _cpu_router(**kw):
    base = dict(top_k=2, use_grouped_topk=False, num_expert_group=None, topk_group=None, renormalize=True,
                scoring_func="softmax", routed_scaling_factor=1.0, e_score_correction_bias=None,
                custom_routing_function=None, _hash_indices_table=None)
    return type("CPURouter", (), {**base, **kw})()


def _same(got, want):
    (gw, gi), (ww, wi) = got, want
    order_g, order_w = gi.sort(-1), wi.sort(-1)  # the same set of experts, in any order
    assert torch.equal(order_g.values, order_w.values)
    assert torch.allclose(gw.gather(-1, order_g.indices), ww.gather(-1, order_w.indices), atol=1e-6)


@pytest.mark.parametrize("renorm, scale", [(True, 2.5), (False, 1.0)])
def test_grouped_sigmoid_with_bias_is_the_engines(renorm, scale):
    """GLM-4.5 / DeepSeek-V3: sigmoid scores + correction bias, groups by their two best, weights clean sigmoid."""
    logits, noise, bias = _data()
    vllm = _cpu_router(use_grouped_topk=True, num_expert_group=4, topk_group=2, renormalize=renorm,
                       scoring_func="sigmoid", routed_scaling_factor=scale, e_score_correction_bias=bias)
    engine = SimpleNamespace(e_score_correction_bias=bias, n_group=4, topk_group=2, top_k=2, norm_topk_prob=renorm,
                             routed_scaling_factor=scale)
    _same(routers.noisy_routing(vllm)(logits, noise), routing.sigmoid_grouped(engine, logits, noise))


def test_grouped_softmax_without_bias_is_the_engines():
    """DeepSeek-V2: softmax, groups by their best expert, never renormalised, times routed_scaling_factor."""
    logits, noise, _ = _data(1)
    vllm = _cpu_router(use_grouped_topk=True, num_expert_group=4, topk_group=2, renormalize=False,
                       routed_scaling_factor=16.0)
    engine = SimpleNamespace(topk_method="group_limited_greedy", num_group=4, topk_group=2, top_k=2,
                             routed_scaling_factor=16.0)
    _same(routers.noisy_routing(vllm)(logits, noise), routing.softmax_group_limited(engine, logits, noise))


def test_tau_zero_is_vllms_own_grouped_routing():
    """Zero noise: the grouped family chooses and weighs exactly as vLLM's CPU grouped top-k."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _grouped_topk

    logits, _, bias = _data(2)
    vllm = _cpu_router(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                       routed_scaling_factor=2.5, e_score_correction_bias=bias)
    want = _grouped_topk(logits, 2, True, 4, 2, "sigmoid", 2.5, bias)
    _same(routers.noisy_routing(vllm)(logits, torch.zeros_like(logits)), (want[0], want[1].long()))


def test_softmax_topk_and_custom_functions_are_the_engines():
    logits, noise, _ = _data(3)
    _same(routers.noisy_routing(_cpu_router())(logits, noise),
          routing.topk_softmax(SimpleNamespace(top_k=2), logits, noise))  # GPT-OSS: softmax over the chosen
    from vllm.model_executor.models.llama4 import Llama4MoE
    from vllm.model_executor.models.phimoe import phimoe_routing_function

    llama4 = _cpu_router(top_k=1, renormalize=False, custom_routing_function=Llama4MoE.custom_routing_function)
    _same(routers.noisy_routing(llama4)(logits, noise), routing.topk_sigmoid(SimpleNamespace(top_k=1), logits, noise))
    phi = _cpu_router(renormalize=False, custom_routing_function=phimoe_routing_function)
    _same(routers.noisy_routing(phi)(logits, noise),
          routing.sparsemixer_top2(SimpleNamespace(router_jitter_noise=0.01), logits, noise))
    # and with zero noise, vLLM's own custom functions
    for r, fn in ((llama4, Llama4MoE.custom_routing_function), (phi, phimoe_routing_function)):
        w, i = fn(hidden_states=logits, gating_output=logits, topk=r.top_k, renormalize=False)
        _same(routers.noisy_routing(r)(logits, torch.zeros_like(logits)), (w.float(), i.long()))


def test_unknown_routers_are_refused_in_one_line():
    unknown = _cpu_router(custom_routing_function=lambda **kw: None)
    for router in (unknown, _cpu_router(e_score_correction_bias=torch.zeros(E)), _cpu_router(scoring_func="sqrtsoftplus"),
                   _cpu_router(_hash_indices_table=torch.zeros(4)), type("ZeroExpertRouter", (), {})()):
        with pytest.raises(RoESettingsError) as info:
            routers.noisy_routing(router)
        assert str(info.value).startswith("roe: ") and "\n" not in str(info.value) and len(str(info.value)) < 200
