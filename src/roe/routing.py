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

from .config import SEED_RANGE  # noqa: F401  (re-exported: it lived here before)

# Version of the noise layout: which Gumbel draw belongs to which (seed, position, sample, MoE layer, expert).
# Profiles and benchmark files record it. Version 1 drew from a host-side torch.Generator per (seed, position);
# version 2 was a 64-bit splitmix hash with a float64 Gumbel transform, which inductor's AVX-512 code computed
# differently from eager (int64 -> float64 conversion in its vector loops); version 3 is the integer-only hash
# and fixed-point transform below. Each version gives other tokens than the one before for the same seed.
NOISE_VERSION = 3

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio in 64 bits), for host-side seeds
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GAMMA32 = 0x4F1BBCDD  # the golden ratio in 32 bits, halved (below 2**31): the per-expert counter's step
# Wellons' lowbias32 mixer with the multipliers of his lower-bias variant: both below 2**31, so a product with a
# 32-bit word stays below 2**63 (no int64 overflow, no split multiply: short expressions for the code generators)
_LOWBIAS = (0x21F0AAAD, 0x735A2D97)
_KEY_STARTS = (0x243F6A88, 0x85A308D3)  # two independent 32-bit key chains (digits of pi) make a 64-bit key
_FIXED_BITS = 19  # the Gumbel values in fixed point: |G| < 23, times 2**19 stays below 2**24 (exact in float32)


def _mul32(x, c: int):
    """x * c mod 2**32 for x in [0, 2**32) and c in [0, 2**31): the product stays below 2**63."""
    return (x * c) & _MASK32


def _mix32(x):
    """lowbias32 (Wellons): a bijection of [0, 2**32) with full avalanche; tensors or Python integers."""
    x = x ^ (x >> 16)
    x = _mul32(x, _LOWBIAS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _LOWBIAS[1])
    return x ^ (x >> 15)


def _gumbel_knots(base: int, cell_bits: int, cells: int) -> list[int]:
    """-log(-log(u)) in fixed point at the uniforms (base + j * 2**cell_bits + 0.5) / 2**32, j < cells, and at the
    last uniform of the range: knots for linear interpolation over `cells` cells of 2**cell_bits values each."""
    points = [base + (j << cell_bits) for j in range(cells)] + [base + (cells << cell_bits) - 1]
    return [round(-math.log(-math.log((b + 0.5) * 2.0**-32)) * (1 << _FIXED_BITS)) for b in points]


# One table: 65,536 cells over all 32-bit uniforms, then 256 finer cells inside each outermost cell, where
# -log(-log(u)) is too curved for a straight line (its tails). Integers, made once from float64 math rounded
# to 2**-19, so every device that is given the table computes the same noise.
_KNOTS = _gumbel_knots(0, 16, 1 << 16) + _gumbel_knots(0, 8, 256) + _gumbel_knots(0xFFFF << 16, 8, 256)
_LOW_TAIL, _HIGH_TAIL = (1 << 16) + 1, (1 << 16) + 258  # where the two tails' knots start
_TABLES: dict[torch.device, torch.Tensor] = {}


def gumbel_table(device) -> torch.Tensor:
    """The knots as an int64 tensor on `device`, made once per device."""
    device = torch.device(device)
    if device not in _TABLES:
        _TABLES[device] = torch.tensor(_KNOTS, dtype=torch.long, device=device)
    return _TABLES[device]


def _key_words(parts: list) -> list:
    """Two 32-bit words of key from non-negative int64 parts (the seed in two halves, then the rest)."""
    words = []
    for start in _KEY_STARTS:
        h = _mix32(start ^ parts[0])
        for p in parts[1:]:
            h = _mix32(h ^ p)
        words.append(h)
    return words


def _key_parts(seed, position, sample, layer) -> list:
    # seeds in [0, 2**63) split into two words; positions, samples and layers are below 2**32
    return [seed & _MASK32, seed >> 32, position & _MASK32, sample & _MASK32, layer & _MASK32]


def _lerp(knot, i, fraction, bits: int):
    lo = knot(i)
    return lo + (((knot(i + 1) - lo) * fraction) >> bits)  # knots increase: the product stays non-negative


def _where(condition, a, b):
    return torch.where(condition, a, b) if isinstance(condition, torch.Tensor) else (a if condition else b)


def _fixed_gumbel(bits, knot):
    """32 uniform bits -> Gumbel in fixed point, by linear interpolation between knots, in integers: the top 16
    bits pick a cell and the low 16 its fraction; in the two outermost cells the low bits pick a finer cell."""
    top, low = bits >> 16, bits & 0xFFFF
    main = _lerp(knot, top, low, 16)
    tail = _lerp(knot, _where(top == 0, _LOW_TAIL, _HIGH_TAIL) + (low >> 8), low & 0xFF, 8)
    return _where((top == 0) | (top == 0xFFFF), tail, main)


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, sample: torch.Tensor, layer: int | torch.Tensor,
                 num_experts: int) -> torch.Tensor:
    """Standard Gumbel noise [..., num_experts] (float32) for (seed, position, sample, MoE layer, expert).

    A pure function of broadcastable int64 tensors, computed wherever its inputs live (no generator, no host
    loop). Bit-identical eagerly, under inductor's C++ (any vector width) and under Triton by construction:
    every value is a non-negative integer below 2**63 (32-bit words times multipliers below 2**31), so
    +, *, ^, & and >> have one meaning everywhere: no wrap-around, no sign bit, no floating-point rounding.
    Expert e draws 32 bits b from the key (two 32-bit words of seed, position, sample, layer) and a counter;
    G = -log(-log(u)) at u = (b + 0.5) / 2**32 comes from a table of knots in fixed point (2**-19), linearly
    interpolated in integers (within 3e-6 of the exact value for u in (2**-8, 1 - 2**-8),
    within 0.06 but in the outermost 2**-24 of either tail);
    the result is an integer below 2**24 times 2**-19, exact in float32.
    `layer` counts MoE layers (0 = the first MoE layer), `sample` the K samples (0 = the clean one, whose
    noise callers ignore), `position` the token's absolute position, padding not counted.
    """
    layer = layer.long() if isinstance(layer, torch.Tensor) else int(layer)  # an int needs no tensor (no copy)
    first, second = _key_words(_key_parts(seed.long(), position.long(), sample.long(), layer))
    counter = _mul32(torch.arange(1, num_experts + 1, device=seed.device, dtype=torch.long), _GAMMA32)  # [E]
    bits = _mix32(_mix32(first[..., None] ^ counter) ^ second[..., None])  # [..., E], 32 uniform bits
    table = gumbel_table(seed.device)
    fixed = _fixed_gumbel(bits, lambda i: table[i])
    return fixed.float() * 2.0**-_FIXED_BITS


def gumbel(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """iid standard Gumbel draws, float32, from an explicit generator (for statistical tests and references)."""
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp_(min=tiny)))


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python integer."""
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
    first, second = _key_words(_key_parts(seed, position, sample, layer))
    counter = (expert + 1) * _GAMMA32 & _MASK32
    bits = _mix32(_mix32(first ^ counter) ^ second)
    return _fixed_gumbel(bits, _KNOTS.__getitem__) * 2.0**-_FIXED_BITS


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


def _keep_top_groups(choice: torch.Tensor, groups: int, topk_group: int, fill: float) -> torch.Tensor:
    """choice [T, E] with every expert outside the `topk_group` best of `groups` expert groups set to `fill`; a
    group scores the sum of its two best values (DeepSeek-V3's group-limited selection)."""
    T, E = choice.shape
    group_scores = choice.view(T, groups, E // groups).topk(min(2, E // groups), dim=-1).values.sum(dim=-1)  # [T, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    return choice.masked_fill(~keep.repeat_interleave(E // groups, dim=1), fill)


def _grouped_weights(router, choice: torch.Tensor, scores: torch.Tensor):
    """The group-limited families' tail: the top_k experts of the perturbed `choice`, weighted by their clean
    `scores`, renormalised where norm_topk_prob, times routed_scaling_factor."""
    idx = choice.topk(router.top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, idx


def sigmoid_grouped(router, logits: torch.Tensor, noise: torch.Tensor):
    """Sigmoid scores plus a correction bias, group-limited top-k (DeepSeek-V3, GLM-4-MoE, dots1).

    The ranked quantity is sigmoid(R) + bias; its logit-space pre-image is R, so
    the noise goes on R before the sigmoid, then the bias and the group limit
    apply to the perturbed scores. Weights are the clean sigmoid scores.
    """
    logits = logits.float()
    scores = logits.sigmoid()
    choice = (logits + noise).sigmoid() + router.e_score_correction_bias.float()
    groups = router.num_group if hasattr(router, "num_group") else router.n_group
    choice = _keep_top_groups(choice, groups, router.topk_group, float("-inf"))
    return _grouped_weights(router, choice, scores)


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


# --- arch-a: Cohere2-MoE, MiniMax-M2 / AFMoE, Phi-3.5-MoE ---


def topk_softmax_or_sigmoid(router, logits: torch.Tensor, noise: torch.Tensor):
    """Cohere2-MoE: top-k of the raw logits, then a softmax over the k chosen (expert_selection_fn="softmax")
    or their sigmoids, renormalised where norm_topk_prob (expert_selection_fn="sigmoid").

    Either way the ranked quantity is R itself, so the noise goes on R: exactly Gumbel-top-k of R / tau.
    """
    logits = logits.float()
    idx = torch.topk(logits + noise, router.top_k, dim=-1).indices
    chosen = logits.gather(-1, idx)  # [T, k] clean logits of the chosen experts
    if router.expert_selection_fn == "sigmoid":
        weights = chosen.sigmoid()
        if router.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, idx
    return F.softmax(chosen, dim=-1), idx


def sigmoid_bias_topk(router, logits: torch.Tensor, noise: torch.Tensor, bias: torch.Tensor):
    """Sigmoid scores, top-k of the scores plus an expert bias that the MoE block passes to its router
    (MiniMax-M2's e_score_correction_bias, AFMoE's expert_bias; no groups); weights are the chosen experts'
    clean sigmoid scores, renormalised, times AFMoE's route_scale.

    As in sigmoid_grouped, the ranked quantity sigmoid(R) + bias is perturbed through its logit pre-image
    R: the noise goes on R before the sigmoid and the bias applies to the perturbed scores. The sigmoid is
    monotone, so with a zero bias the choice is exactly Gumbel-top-k of R / tau; the (load-balancing) bias
    shifts the noisy choice exactly as it shifts the clean one.
    """
    logits = logits.float()
    scores = logits.sigmoid()
    choice = (logits + noise).sigmoid() + bias.float()
    idx = torch.topk(choice, router.top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    scale = getattr(router, "route_scale", None)
    if scale is None:  # MiniMax-M2: a plain renormalisation
        return weights / weights.sum(dim=-1, keepdim=True), idx
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale, idx


def _sparsemixer_weight(scores: torch.Tensor, candidates: torch.Tensor, chosen: torch.Tensor, eps: float):
    """Phi-MoE's sparsemixer weight (eval mode) of `chosen` [T, 1]: the softmax over `candidates` [T, E]
    (scores with earlier choices at -inf) of the experts whose clean score is within the relative distance
    2 * eps of the chosen one's (the model's threshold, anchored at the chosen expert instead of the maximum)."""
    top = scores.gather(-1, chosen)  # [T, 1]
    factor = scores.abs().clamp(min=top)
    far = (top - scores) / factor > 2 * eps
    return F.softmax(candidates.masked_fill(far, float("-inf")), dim=-1).gather(-1, chosen)


def sparsemixer_top2(router, logits: torch.Tensor, noise: torch.Tensor):
    """Phi-3.5-MoE's sparsemixer (eval mode): the first expert is the top logit, the second the top of the rest,
    each weighted by a softmax over the experts whose logits lie within 2 * router_jitter_noise of its own.

    In eval mode the masks change only the weights, never the choice: the two experts are the top-2 of R. So
    the noise goes on R and the perturbed logits R + tau * G choose, in order (first: argmax, a draw from
    softmax(R / tau); second: argmax of the rest): exactly Gumbel-top-2 of R / tau, as in every other family.
    The weights are the model's own sparsemixer formula for the chosen experts on the CLEAN logits R, with each
    mask anchored at the chosen expert's logit (where the choice is the clean one, the model's weights exactly).
    """
    logits = logits.float()
    eps = router.router_jitter_noise
    noisy = logits + noise
    first = noisy.argmax(dim=-1, keepdim=True)  # [T, 1]
    second = noisy.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
    w_first = _sparsemixer_weight(logits, logits, first, eps)
    w_second = _sparsemixer_weight(logits, logits.scatter(-1, first, float("-inf")), second, eps)
    return torch.cat([w_first, w_second], dim=-1), torch.cat([first, second], dim=-1)

# --- arch-b: llama4_text, dbrx, longcat_flash --------------------------------------------------------


def topk_sigmoid(router, logits: torch.Tensor, noise: torch.Tensor):
    """Top-k of the raw logits, then a sigmoid of each chosen logit, unnormalised (Llama 4: top-1).

    The ranked quantity is the logit itself, so the noise goes on R; weights are sigmoid(R) of the clean
    logits of the chosen experts, as the model computes them.
    """
    logits = logits.float()
    idx = torch.topk(logits + noise, router.top_k, dim=-1).indices
    return logits.gather(-1, idx).sigmoid(), idx


def softmax_topk_pnorm(block, logits: torch.Tensor, noise: torch.Tensor):
    """DBRX: softmax, top-k of the probabilities, weights divided by their p-norm (`moe_normalize_expert_weights`,
    None: not renormalised). top-k of softmax(R) ranks like R: the noise goes on R. `block` is DBRX's FFN block,
    which holds top_k and p (its router module holds only the linear layer)."""
    logits = logits.float()
    idx = torch.topk(logits + noise, block.top_k, dim=-1).indices
    weights = F.softmax(logits, dim=-1).gather(-1, idx)
    p = block.moe_normalize_expert_weights
    if p is not None:
        weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
    return weights, idx


def softmax_bias_scaled(router, logits: torch.Tensor, noise: torch.Tensor):
    """LongCat-Flash: top-k of softmax(R) plus a correction bias; weights the clean probabilities times
    `routed_scaling_factor`, unnormalised. The ranked quantity is perturbed through R (as for ERNIE). The
    logits cover the zero-computation experts too, so the noise can choose them like any other expert."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    choice = F.softmax(logits + noise, dim=-1) + router.e_score_correction_bias.float()
    idx = torch.topk(choice, router.top_k, dim=-1).indices
    return probs.gather(-1, idx) * router.routed_scaling_factor, idx


# --- arch-d: sigmoid top-k (Flint, Laguna, HY-V3), Beam's unscaled DeepSeek-V3 router, Mistral-4's grouped softmax ---


def sigmoid_topk(logits: torch.Tensor, noise: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
                 normalize: bool = True, eps: float = 0.0, scale: float = 1.0):
    """Sigmoid scores, top-k of the scores (plus an expert bias where the model adds one), no groups; weights are
    the chosen experts' clean sigmoid scores, renormalised where the model does (sum + eps), times `scale`.

    The ranked quantity sigmoid(R) + bias is perturbed through its logit pre-image R: the noise goes on R
    before the sigmoid and the bias applies to the perturbed scores, as in sigmoid_grouped. The sigmoid is
    monotone, so without a bias the choice is exactly Gumbel-top-k of R / tau.
    """
    logits = logits.float()
    scores = logits.sigmoid()
    choice = (logits + noise).sigmoid()
    if bias is not None:
        choice = choice + bias.float()
    idx = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights * scale, idx


def flint_sigmoid_topk(router, logits: torch.Tensor, noise: torch.Tensor):
    """Flint: sigmoid scores without an expert bias, renormalised where norm_topk_prob."""
    return sigmoid_topk(logits, noise, router.top_k, normalize=router.norm_topk_prob)


def laguna_sigmoid_topk(router, logits: torch.Tensor, noise: torch.Tensor):
    """Laguna (and Mellum's parent): the router's own correction bias, always renormalised. Its logits R are the
    tanh-softcapped ones where the model softcaps (the router returns those), so the noise goes after the cap."""
    return sigmoid_topk(logits, noise, router.top_k, bias=router.e_score_correction_bias)


def hy_v3_sigmoid_topk(router, logits: torch.Tensor, noise: torch.Tensor, bias: torch.Tensor):
    """HY-V3: the MoE block hands its router the correction bias; renormalised (+1e-20), times router_scaling_factor."""
    return sigmoid_topk(logits, noise, router.top_k, bias=bias, eps=1e-20, scale=router.router_scaling_factor)


class _Override:
    """A router seen with some attributes replaced (everything else read through from the router)."""

    def __init__(self, router, **overrides):
        self._router, self._overrides = router, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._router, name)


def sigmoid_grouped_unscaled(router, logits: torch.Tensor, noise: torch.Tensor):
    """Beam: DeepSeek-V3's router, whose routed_scaling_factor the MoE block applies after the experts instead
    (the router has none): sigmoid_grouped with a scale of 1."""
    return sigmoid_grouped(_Override(router, routed_scaling_factor=1.0), logits, noise)


def softmax_grouped(router, logits: torch.Tensor, noise: torch.Tensor):
    """Mistral-4: softmax probabilities, group-limited top-k (a group scores the sum of its two best
    probabilities, experts outside the topk_group best groups are set to 0), weights renormalised (+1e-20)
    where norm_topk_prob, times routed_scaling_factor.

    The ranked quantity softmax(R) orders like R, so the noise goes on R: the group limit and the top-k
    apply to softmax(R + tau * G); the weights are the clean probabilities of the chosen experts.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    choice = F.softmax(logits + noise, dim=-1)
    choice = _keep_top_groups(choice, router.num_group, router.topk_group, 0.0)  # the model's fill: 0, not -inf
    return _grouped_weights(router, choice, probs)


def muse_spark_sigmoid_topk(router, logits: torch.Tensor, noise: torch.Tensor):
    """MuseSpark: the router's logits (already times output_multiplier, as it returns them), its own correction
    bias, renormalised (+norm_topk_prob_eps), times routed_scaling_factor."""
    return sigmoid_topk(logits, noise, router.top_k, bias=router.e_score_correction_bias,
                        eps=router.norm_topk_prob_eps, scale=router.routed_scaling_factor)


def gemma4_probs_topk(router, probs: torch.Tensor, noise: torch.Tensor):
    """Gemma 4: its router returns softmax probabilities p, not logits; top-k of p, renormalised, each weight
    times its expert's per_expert_scale.

    The ranked quantity p has the logit pre-image log p = R - logsumexp(R), R shifted by one constant per
    token, so top-k of log p + tau * G is exactly Gumbel-top-k of R / tau.
    """
    probs = probs.float()
    idx = torch.topk(probs.log() + noise, router.config.top_k_experts, dim=-1).indices
    weights = probs.gather(-1, idx)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * router.per_expert_scale[idx].float(), idx


def softmax_topk_v2(router, logits: torch.Tensor, noise: torch.Tensor):
    """DeepSeek-V2's router as DeepSeek-OCR-2 keeps it: softmax probabilities, top-k ("greedy"), or top-k within
    the topk_group groups of highest maximum probability ("group_limited_greedy", the others set to 0); the
    chosen probabilities, not renormalised, times routed_scaling_factor.

    softmax(R) orders like R, so the noise goes on R: the group limit and the top-k apply to softmax(R + tau*G);
    the weights are the clean probabilities (0 where the model's mask would zero a chosen expert).
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    choice = F.softmax(logits + noise, dim=-1)
    keep = torch.ones_like(choice, dtype=torch.bool)
    if router.topk_method == "group_limited_greedy":
        T, E = choice.shape
        group_scores = choice.view(T, router.num_group, E // router.num_group).max(dim=-1).values
        groups = torch.zeros_like(group_scores, dtype=torch.bool)
        groups.scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, True)
        keep = groups.repeat_interleave(E // router.num_group, dim=1)
        choice = choice.masked_fill(~keep, 0.0)
    idx = choice.topk(router.top_k, dim=-1).indices
    weights = probs.gather(-1, idx) * keep.gather(-1, idx)
    return weights * router.routed_scaling_factor, idx


# --- hybrid MoEs ---


def sigmoid_expert_bias(router, logits: torch.Tensor, noise: torch.Tensor, expert_bias=None):
    """LFM2-MoE: top-k of sigmoid(R) plus the block's expert bias (handed to the router as an input), weights the
    clean sigmoid scores of the chosen, optionally renormalised, times the routed scaling factor.

    The ranked quantity sigmoid(R) + bias is perturbed through its logit-space pre-image R.
    """
    logits = logits.float()
    scores = logits.sigmoid()
    choice = (logits + noise).sigmoid()
    if router.use_expert_bias:
        choice = choice + expert_bias.float()
    idx = torch.topk(choice, router.top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return weights * router.routed_scaling_factor, idx


# --- DeepSeek-like families (arch-c) ---


def softmax_group_limited(router, logits: torch.Tensor, noise: torch.Tensor):
    """Softmax scores, top-k (`topk_method` "greedy") or group-limited top-k ("group_limited_greedy"), weights
    times `routed_scaling_factor`, never renormalised (DeepSeek-V2, V2-Lite, V2.5).

    The ranked quantity is softmax(R), whose ranking is that of R, so the noise goes on R before the softmax; the
    group limit (each group scored by its best expert) then applies to the perturbed scores, as the model applies
    it to its clean ones. Weights are the clean softmax probabilities of the chosen experts.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    choice = F.softmax(logits + noise, dim=-1)
    if router.topk_method == "group_limited_greedy":
        T, E = choice.shape
        groups = router.num_group
        group_scores = choice.view(T, groups, E // groups).max(dim=-1).values  # [T, groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // groups, dim=1), 0.0)  # as the model: 0, not -inf
    elif router.topk_method != "greedy":
        raise ValueError(f"RoE does not know DeepSeek-V2's topk_method {router.topk_method!r}")
    idx = choice.topk(router.top_k, dim=-1).indices
    return probs.gather(-1, idx) * router.routed_scaling_factor, idx


def biased_logit_topk_sigmoid(router, logits: torch.Tensor, noise: torch.Tensor):
    """Top-k of the logits plus a correction bias, weights the sigmoid of the chosen logits, renormalised where
    `norm_topk_prob` says (Kolibri-1).

    The ranked quantity R + bias is in logit space already, so the noise goes on it (on R); the bias shifts the
    choice only. Weights are the clean sigmoid scores of the chosen experts.
    """
    logits = logits.float()
    idx = torch.topk(logits + noise + router.e_score_correction_bias.float(), router.top_k, dim=-1).indices
    weights = logits.gather(-1, idx).sigmoid()
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx
