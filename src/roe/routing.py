"""Gumbel-top-k routing: the noise, where it goes, and the per-layer tau schedule.

For one token at one MoE layer with router logits R over E experts:

    chosen = TopK(R + tau * G, k),   G ~ iid Gumbel(0, 1)

which draws k experts without replacement from softmax(R / tau). The mixing
weights of the chosen experts are then computed the model's own way; only the
choice is stochastic. Each router family below says what "R" is for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Version of the noise layout: which Gumbel draw belongs to which (seed, position, sample, MoE layer, expert).
# Profiles and benchmark files record it; version 2 is the counter-based hash below (version 1 drew from a
# host-side torch.Generator per (seed, position)), so the same seed gives other tokens than under version 1.
NOISE_VERSION = 2

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio in 64 bits)
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SEED_RANGE = (0, 1 << 63)  # seeds are stored as int64 tensors


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed integers)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2**64 on CPU and CUDA)."""
    x = (x ^ _srl(x, 30)) * _signed(_MIX1)
    x = (x ^ _srl(x, 27)) * _signed(_MIX2)
    return x ^ _srl(x, 31)


def noise_key(seed: torch.Tensor, position: torch.Tensor, sample: torch.Tensor,
              layer: int | torch.Tensor) -> torch.Tensor:
    """A 64-bit key per (seed, position, sample, MoE layer); broadcastable int64 tensors in, int64 out."""
    h = _mix(seed.long() + _signed(_GAMMA))
    h = _mix(h ^ position.long())
    h = _mix(h ^ sample.long())
    return _mix(h ^ (layer.long() if isinstance(layer, torch.Tensor) else int(layer)))


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, sample: torch.Tensor, layer: int | torch.Tensor,
                 num_experts: int) -> torch.Tensor:
    """Standard Gumbel noise [..., num_experts] (float32) for (seed, position, sample, MoE layer, expert).

    A pure function, computed with integer tensor operations wherever its inputs live (no generator, no host
    loop): expert e of a key draws splitmix64's e-th output, whose top 24 bits give u in (0, 1), exactly
    representable in float32. The uniforms are bit-identical on every device; the Gumbel transform
    -log(-log(u)) runs in float64 and is rounded to float32, so devices agree up to that rounding.
    `layer` counts MoE layers (0 = the first MoE layer), `sample` the K samples (0 = the clean one, whose
    noise callers ignore), `position` the token's absolute position, padding not counted.
    """
    key = noise_key(seed, position, sample, layer)[..., None]  # [..., 1]
    counter = torch.arange(1, num_experts + 1, device=key.device, dtype=torch.long) * _signed(_GAMMA)
    bits = _srl(_mix(key + counter), 40)  # [..., E], 24 uniform bits
    u = (bits.double() + 0.5) * 2.0**-24
    return (-torch.log(-torch.log(u))).float()


def gumbel(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """iid standard Gumbel draws, float32, from an explicit generator (for statistical tests and references)."""
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp_(min=tiny)))


def _mix_int(x: int) -> int:
    """`_mix` on a Python integer."""
    x = (x ^ (x >> 30)) * _MIX1 & _MASK64
    x = (x ^ (x >> 27)) * _MIX2 & _MASK64
    return x ^ (x >> 31)


def noise_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, for host-side generators (the sampling draws)."""
    h = 0
    for p in parts:
        h = _mix_int((h ^ (int(p) & _MASK64)) + _GAMMA & _MASK64)
    return h & ((1 << 63) - 1)


def python_gumbel(seed: int, position: int, sample: int, layer: int, expert: int) -> float:
    """The same draw as `gumbel_noise`, in plain Python integers: an independent reference for tests."""
    h = _mix_int((seed + _GAMMA) & _MASK64)
    for part in (position, sample, layer):
        h = _mix_int(h ^ (part & _MASK64))
    bits = _mix_int((h + (expert + 1) * _GAMMA) & _MASK64) >> 40
    u = (bits + 0.5) * 2.0**-24
    return -math.log(-math.log(u))


def layer_taus(tau: float | Sequence[float], skip_layers: int, num_moe_layers: int) -> list[float]:
    """The per-MoE-layer tau vector.

    A float gives the same tau to every MoE layer except the first and last
    `skip_layers`, which stay clean (the paper's first heuristic). A sequence is
    taken as is and must have one value per MoE layer.
    """
    if isinstance(tau, (int, float)):
        if tau == 0:
            return [0.0] * num_moe_layers
        if 2 * skip_layers >= num_moe_layers:
            raise ValueError(
                f"skip_layers={skip_layers} leaves no noisy layer: the model has {num_moe_layers} MoE layers "
                f"and the first and last {skip_layers} stay clean. Use skip_layers < {math.ceil(num_moe_layers / 2)}."
            )
        middle = num_moe_layers - 2 * skip_layers
        return [0.0] * skip_layers + [float(tau)] * middle + [0.0] * skip_layers
    taus = [float(t) for t in tau]
    if len(taus) != num_moe_layers:
        raise ValueError(
            f"tau has {len(taus)} values but the model has {num_moe_layers} MoE layers: give one value per MoE layer "
            f"or a single float."
        )
    return taus


# --- router families -------------------------------------------------------------------------------
# Each takes the router module, its clean logits [T, E] and the scaled noise tau*G [T, E] and returns
# (weights [T, k] float32, indices [T, k]) for the noisy choice, with weights computed the model's way.


def softmax_topk(router, logits: torch.Tensor, noise: torch.Tensor, normalize: bool):
    """Softmax over experts, top-k of the probabilities (OLMoE, Mixtral, Qwen-MoE, Jamba).

    top-k of softmax(R) ranks like top-k of R, so the noise goes on R.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    idx = torch.topk(logits + noise, router.top_k, dim=-1).indices
    weights = probs.gather(-1, idx)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def topk_softmax(router, logits: torch.Tensor, noise: torch.Tensor):
    """Top-k of the raw logits, then a softmax over the k chosen (GPT-OSS, Granite-MoE)."""
    logits = logits.float()
    idx = torch.topk(logits + noise, router.top_k, dim=-1).indices
    return F.softmax(logits.gather(-1, idx), dim=-1), idx


def sigmoid_grouped(router, logits: torch.Tensor, noise: torch.Tensor):
    """Sigmoid scores plus a correction bias, group-limited top-k (DeepSeek-V3, GLM-4-MoE, dots1).

    The ranked quantity is sigmoid(R) + bias; its logit-space pre-image is R, so
    the noise goes on R before the sigmoid, then the bias and the group limit
    apply to the perturbed scores. Weights are the clean sigmoid scores.
    """
    logits = logits.float()
    scores = logits.sigmoid()
    choice = (logits + noise).sigmoid() + router.e_score_correction_bias.float()
    T, E = choice.shape
    groups = router.num_group if hasattr(router, "num_group") else router.n_group
    grouped = choice.view(T, groups, E // groups)
    group_scores = grouped.topk(min(2, E // groups), dim=-1).values.sum(dim=-1)  # [T, groups]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // groups, dim=1), float("-inf"))
    idx = choice.topk(router.top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, idx


def softmax_bias_topk(router, logits: torch.Tensor, noise: torch.Tensor):
    """ERNIE-4.5-MoE: top-k of softmax probabilities plus a statistics bias; weights renormalised.

    The ranked quantity softmax(R) + bias is perturbed through R.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    noisy = router.moe_statics(F.softmax(logits + noise, dim=-1))
    idx = torch.topk(noisy, router.top_k, dim=-1).indices
    weights = probs.gather(-1, idx)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=router.norm_min), idx
