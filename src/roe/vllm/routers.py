"""Gumbel-top-k for the noisy rows, for each kind of vLLM MoE router.

The choice is keyed by what the vLLM router computes (its class's attributes: grouped top-k, scoring function,
correction bias, custom routing function), not by the model, so every model that builds the same router gets
the same noisy routing. Each family puts the noise where the project's engine does (roe.routing): on the
logit pre-image of the quantity the router ranks, and computes the chosen experts' weights the router's own way
(clean scores, renormalised where the router renormalises, times its routed_scaling_factor). vLLM's routers
(vllm/model_executor/layers/fused_moe/router/): on the CPU every model gets `CPURouter`; on a GPU the factory
picks GroupedTopKRouter, CustomRoutingRouter, FusedTopKBiasRouter or FusedTopKRouter, with the same attributes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import routing
from .settings import RoESettingsError

# (router logits [T, E] in vLLM's dtype, tau-scaled noise [T, E] float32) -> (weights [T, k] float32, expert ids
# [T, k]); a family computes in float32 except where vLLM's own router works in the logits' dtype (sparsemixer)
Route = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _scores(scoring: str):
    if scoring == "softmax":
        return lambda x: F.softmax(x, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid
    raise RoESettingsError(f"roe: routers scoring with {scoring!r} are not supported by the plugin")


def _finish(router, weights: torch.Tensor) -> torch.Tensor:
    if getattr(router, "renormalize", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)


def grouped(router) -> Route:
    """vLLM's grouped top-k (DeepSeek-V2/V3, GLM-4.5, ...): scores (softmax or sigmoid) plus an optional
    correction bias; groups ranked by the sum of their two best biased scores (with a bias) or their best score
    (without); top-k inside the `topk_group` best groups. The noise goes on the logits before the scoring
    function (their pre-image), the bias and the group limit then apply to the perturbed scores, as in the
    engine's sigmoid_grouped / softmax_group_limited; weights are the clean scores of the chosen experts."""
    score = _scores(router.scoring_func)
    bias = router.e_score_correction_bias
    groups, topk_group, top_k = int(router.num_expert_group), int(router.topk_group), int(router.top_k)

    def route(logits, noise):
        logits = logits.float()
        choice = score(logits + noise)  # [T, E]
        if bias is not None:
            choice = choice + bias.float()[None]
        T, E = choice.shape
        per_group = choice.view(T, groups, E // groups)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1) if bias is not None else per_group.max(-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)  # [T, groups]
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // groups, dim=1), float("-inf"))
        ids = choice.topk(top_k, dim=-1).indices
        return _finish(router, score(logits).gather(-1, ids)), ids

    return route


def biased(router) -> Route:
    """vLLM's FusedTopKBiasRouter (a GPU's non-grouped router with a correction bias): top-k of score + bias;
    noise on the logits before the scoring function, weights the clean scores."""
    score = _scores(router.scoring_func)
    bias, top_k = router.e_score_correction_bias, int(router.top_k)

    def route(logits, noise):
        logits = logits.float()
        ids = (score(logits + noise) + bias.float()[None]).topk(top_k, dim=-1).indices
        return _finish(router, score(logits).gather(-1, ids)), ids

    return route


def softmax_topk(router) -> Route:
    """vLLM's plain softmax top-k (FusedTopKRouter, CPURouter's default): the softmax ranks as the logits do, so
    the noise goes on them; weights the clean probabilities, renormalised where the router renormalises
    (a softmax over the chosen logits: GPT-OSS, Mixtral, ...)."""
    scoring = getattr(router, "scoring_func", "softmax")
    if scoring == "sigmoid":
        return sigmoid_topk(router)
    _scores(scoring)
    top_k, renormalize = int(router.top_k), bool(getattr(router, "renormalize", True))

    def route(logits, noise):
        logits = logits.float()
        ids = torch.topk(logits + noise, top_k, dim=-1).indices
        weights = F.softmax(logits, dim=-1).gather(-1, ids)
        return (weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights), ids

    return route


def sigmoid_topk(router) -> Route:
    """FusedTopKRouter with sigmoid scoring and no bias: top-k of sigmoid(R), ranked as R."""
    top_k = int(router.top_k)

    def route(logits, noise):
        logits = logits.float()
        ids = torch.topk(logits + noise, top_k, dim=-1).indices
        return _finish(router, logits.sigmoid().gather(-1, ids)), ids

    return route


def _topk_then_sigmoid(router) -> Route:
    """Llama 4's custom routing: top-k of the raw logits, weights sigmoid(chosen logits), never renormalised
    (the engine's topk_sigmoid): the ranked quantity is the logit itself."""
    top_k = int(router.top_k)

    def route(logits, noise):
        logits = logits.float()
        ids = torch.topk(logits + noise, top_k, dim=-1).indices
        return logits.gather(-1, ids).sigmoid(), ids

    return route


def _sparsemixer(router) -> Route:
    """Phi-3.5-MoE's sparsemixer top-2: the engine's family (roe.routing.sparsemixer_top2: Gumbel-top-2 of R,
    weights the model's sparsemixer formula on the clean logits, anchored at each chosen expert), with vLLM's
    threshold: its sparsemixer hard-codes jitter_eps = 0.01 whatever the config's router_jitter_noise says."""

    def route(logits, noise):
        # the choice: Gumbel-top-2 of R in float32; the weights: vLLM's masks and softmaxes in the logits' own
        # dtype (in bfloat16 its relative threshold 2 * eps rounds differently from float32: an expert near it
        # would join or leave the softmax and change the weight by up to half)
        noisy = logits.float() + noise
        first = noisy.argmax(dim=-1, keepdim=True)  # [T, 1]
        second = noisy.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        w_first = routing._sparsemixer_weight(logits, logits, first, 0.01)
        w_second = routing._sparsemixer_weight(logits, logits.scatter(-1, first, float("-inf")), second, 0.01)
        return torch.cat([w_first, w_second], dim=-1).float(), torch.cat([first, second], dim=-1)

    return route


# custom routing functions the plugin knows, by "module:qualified name" -> the family that reproduces them
CUSTOM: dict[str, Callable[[object], Route]] = {
    "vllm.model_executor.models.llama4:Llama4MoE.custom_routing_function": _topk_then_sigmoid,
    "vllm.model_executor.models.phimoe:phimoe_routing_function": _sparsemixer,
}


# the vLLM router classes whose computation the families above reproduce (others: zero experts, routing
# simulation, ROCm's fused shared experts, ... are refused)
KNOWN = {"CPURouter", "GroupedTopKRouter", "FusedTopKRouter", "FusedTopKBiasRouter", "CustomRoutingRouter"}


def noisy_routing(router) -> Route:
    """The noisy-row routing that reproduces `router`'s family, or a one-line refusal."""
    kind = type(router).__name__
    if kind not in KNOWN or getattr(router, "num_fused_shared_experts", 0):
        raise RoESettingsError(f"roe: vLLM's {kind} (this model's MoE router) is not supported by the plugin")
    if getattr(router, "_hash_indices_table", None) is not None:
        raise RoESettingsError("roe: hash-routed MoE layers (a fixed expert per token id) are not supported by the plugin")
    if getattr(router, "use_grouped_topk", False) or type(router).__name__ == "GroupedTopKRouter":
        return grouped(router)
    custom = getattr(router, "custom_routing_function", None)
    if custom is not None:
        name = f"{getattr(custom, '__module__', '?')}:{getattr(custom, '__qualname__', repr(custom))}"
        if name not in CUSTOM:
            raise RoESettingsError(f"roe: the custom MoE routing function {name!r} is not supported by the plugin")
        return CUSTOM[name](router)
    if getattr(router, "e_score_correction_bias", None) is not None:
        if type(router).__name__ == "CPURouter":  # its non-grouped path ranks without the bias: so would ours
            raise RoESettingsError("roe: vLLM's CPU router ignores this model's correction bias; not supported by the plugin")
        return biased(router)
    return softmax_topk(router)
