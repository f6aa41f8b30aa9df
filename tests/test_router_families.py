"""Each registered router family, given zero noise, computes exactly the routing the model's own router computed.

The noisy rows' weights come from the family's own code (not the model's), so a family that reads the wrong
bias, forgets a scale or renormalises where the model does not would go unnoticed by the tau = 0 tests, which
only see the model's clean routing. Here every MoE layer's router output, from a plain forward of each tiny
checkpoint, is recomputed by the family from the same logits with no noise.
"""

import pytest
import torch

from roe import adapters
from tiny import ARCHS, tiny_model


def _dense(weights: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] weights at [T, k] indices -> [T, E] (order-free: some routers return their top-k unsorted)."""
    return torch.zeros(idx.shape[0], num_experts).scatter(1, idx.long(), weights.float())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_zero_noise_reproduces_the_models_own_routing(arch):
    model = tiny_model(arch)
    adapter = adapters.adapter_for(model)
    calls = []
    hooks = [r.register_forward_hook(lambda mod, args, out: calls.append((mod, args, out)))
             for r in adapters.find_routers(model)]
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1)))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(hooks)
    for router, args, out in calls:
        logits, weights, idx = out[::-1] if not out[0].is_floating_point() else out  # GraniteMoe < 5.18
        flat = logits.reshape(-1, logits.shape[-1]).float()
        extra = args[1:] if adapter.router_args else ()
        got_w, got_idx = adapter.select(router, flat, torch.zeros_like(flat), *extra)
        E = flat.shape[-1]
        torch.testing.assert_close(_dense(got_w, got_idx, E), _dense(weights, idx, E), atol=1e-6, rtol=1e-5)
