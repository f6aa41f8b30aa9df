"""Noisy routing for vLLM's grouped top-k routers (DeepSeek-V2 softmax, DeepSeek-V3 sigmoid + correction bias).

(vllm-mla branch; the vllm-ports branch generalises the router hook for glm4_moe in routers.py: the same
selection, to be deduplicated at merge.)

vLLM's grouped router (`CPURouter._grouped_topk`, `GroupedTopKRouter`) scores the logits R with a softmax or a
sigmoid, adds the correction bias if any, keeps the `topk_group` best of `num_expert_group` groups (a group
scores its best expert, or its two best when there is a bias), picks the top-k, and weights the chosen experts
by their clean scores (renormalised where the router renormalises) times `routed_scaling_factor`. For a noisy
row the ranked quantity is perturbed through its logit pre-image, as the project's engine does
(roe.routing.sigmoid_grouped, softmax_group_limited): the scores of R + tau * G, then the bias and the group
limit; the weights stay the clean scores of the chosen experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .settings import RoESettingsError


def is_grouped(router) -> bool:
    biased = getattr(router, "e_score_correction_bias", None) is not None
    return bool(getattr(router, "use_grouped_topk", False)) or biased


def grouped_select(router):
    """select(logits [T, E], noise [T, E]) -> (weights [T, k] float32, ids [T, k]) for one vLLM router."""
    scoring = getattr(router, "scoring_func", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise RoESettingsError(f"roe: routers scoring with {scoring!r} are not supported by the plugin")
    if not getattr(router, "use_grouped_topk", False):
        raise RoESettingsError(
            f"roe: {type(router).__name__} (biased routing without groups) is not supported by the plugin"
        )
    groups, topk_group = int(router.num_expert_group or 1), int(router.topk_group or 1)
    top_k, renormalize = int(router.top_k), bool(router.renormalize)
    scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)

    def score(x):
        return F.softmax(x, dim=-1) if scoring == "softmax" else x.sigmoid()

    def select(logits: torch.Tensor, noise: torch.Tensor):
        logits = logits.float()
        bias = router.e_score_correction_bias
        choice = score(logits + noise)
        if bias is not None:
            choice = choice + bias.float()[None]
        T, E = choice.shape
        per = choice.view(T, groups, E // groups)
        group_scores = per.topk(2, dim=-1).values.sum(-1) if bias is not None else per.max(dim=-1).values  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // groups, dim=1), float("-inf"))
        idx = choice.topk(top_k, dim=-1).indices
        weights = score(logits).gather(-1, idx)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * scale, idx

    return select
