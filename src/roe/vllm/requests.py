"""Per-request RoE settings in vLLM: refused with one line, never silently dropped.

The RoE settings are the deployment's (`hf_overrides={"roe": ...}`): the noisy rows of every sequence in a step
share one K and one layer schedule. A request that asks for its own (`SamplingParams(extra_args={"roe": ...})`,
the server's `vllm_xargs`) is refused when vLLM admits it (HTTP 400 from the server), through the
`validate_params` hook of a logits processor that the gate adds to a RoE deployment and that changes no logits.
(A top-level `extra_body={"roe": ...}` field never reaches a plugin: vLLM 0.32's server drops unknown request
fields when it parses them, logging them at debug level.)
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

FQCN = "roe.vllm.requests:RoERequestGuard"


class RoERequestGuard(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        keys = [k for k in (getattr(sampling_params, "extra_args", None) or {}) if str(k).lower().startswith("roe")]
        if keys:
            raise ValueError(
                f"roe: per-request RoE settings ({', '.join(map(repr, keys))}) are not supported in vLLM; the "
                "deployment's hf_overrides 'roe' settings apply to every request"
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # changes nothing: vLLM may skip it for greedy requests

    def update_state(self, batch_update) -> None:
        pass
