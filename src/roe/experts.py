"""Expert dispatch for the few rows of a RoE decode step, chosen per layer shape.

transformers runs a layer's experts with `grouped_mm` by default: the (row, expert)
pairs are sorted by expert and each touched expert multiplies its own rows. On a
CPU with small experts that is a loop of tiny matrix products whose fixed cost
dominates, and RoE's K rows touch more experts than one row does. `dense` instead
runs every expert on every row in one batched matrix product per projection and
zeroes the unchosen ones through the routing weights: E/k times the arithmetic, a
few kernel calls. It wins while a layer's experts are small (measured by
`benchmarks/expert_dispatch.py`); for large experts it would read weights no row
asked for, so `auto` keeps transformers' kernel there, and in 16-bit weights, whose rounding
the dense path would change. The rule is fixed, not timed
at run time, so the same inputs always take the same arithmetic path.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

DENSE = "roe_dense"
AUTO = "roe_auto"
# dense only where measured faster (CPU, experts small enough to stay in cache); see benchmarks/RESULTS-perf.md
DENSE_MAX_WEIGHT_BYTES = 4 * 2**20
DENSE_MAX_ELEMENTS = 2**22  # the [E, rows, 2I] intermediate


def _expert_weights(experts) -> tuple[torch.Tensor, torch.Tensor]:
    return (experts.gate_up_proj if experts.has_gate else experts.up_proj), experts.down_proj


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x [E or 1, N, in] through every expert's weight [E, out, in] (or [E, in, out]) -> [E, N, out]."""
    out = torch.matmul(x, weight if transposed else weight.transpose(1, 2))
    return out if bias is None else out + bias[:, None, :]


def dense_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every row; hidden [N, D], top_k [N, k] -> [N, D], as the model's own experts compute it."""
    up, down = _expert_weights(experts)
    up_bias = down_bias = None
    if experts.has_bias:
        up_bias = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
        down_bias = experts.down_proj_bias
    h = _linear(hidden_states.to(up.dtype)[None], up, up_bias, experts.is_transposed)  # [E, N, 2I]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)  # [E, N, I]
    out = _linear(h, down, down_bias, experts.is_transposed)  # [E, N, D]
    if getattr(experts, "has_post_expert_norm", False):  # transformers >= 5.18; earlier releases have no such norm
        out = experts.post_expert_norm(out)
    N, E = hidden_states.shape[0], up.shape[0]
    mix = torch.zeros(N, E, dtype=torch.float32, device=hidden_states.device)
    mix.scatter_(1, top_k_index, top_k_weights.float())  # [N, E], zero for every expert a row did not choose
    return torch.einsum("ne,end->nd", mix, out.float()).to(hidden_states.dtype)


def prefers_dense(experts, rows: int) -> bool:
    up, down = _expert_weights(experts)
    weight_bytes = (up.numel() + down.numel()) * up.element_size()
    # float32 only: in 16 bits the dense path's rounding (a float32 weighted sum of every expert's output)
    # differs from transformers' kernel, and a greedy token near a tie would differ from the model's own
    return (up.device.type == "cpu" and up.dtype == torch.float32 and weight_bytes <= DENSE_MAX_WEIGHT_BYTES
            and rows * max(up.shape[1:]) * up.shape[0] <= DENSE_MAX_ELEMENTS)


def auto_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    if prefers_dense(experts, hidden_states.shape[0]):
        return dense_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(DENSE, dense_experts_forward)
ALL_EXPERTS_FUNCTIONS.register(AUTO, auto_experts_forward)
