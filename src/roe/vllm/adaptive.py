"""Adaptive K in vLLM (RoEConfig.adaptive_metric): the engine's rule, per sequence, across vLLM's steps.

The engine (engine.py) lets a token's K-1 noisy samples take effect where the clean prediction its input token
was drawn from (the previous position's) is uncertain; a skipped token's aggregate is the clean distribution
exactly. In a vLLM step each sequence's RoE token is its last scheduled token, and the previous position's
clean prediction is

* with one scheduled token (a decode step, or a one-token last prefill chunk): the previous step's, kept per
  sequence in `RoEAdaptiveGate.gate`, a tensor indexed like vLLM's persistent batch (whose row i is row i of
  the step's logits). The gate is known before the forward, so a skipped sequence's noisy rows get no noise:
  they route, and read experts, exactly as the clean row;
* with several (a prefill chunk): this forward's own, at the row before the RoE token, known only after the
  forward. The noisy rows run, and the aggregate is the clean distribution where the rule says skip (as the
  engine's chunks do, `RoEPass.combine`).

After the logits, each sequence's clean prediction at its RoE token sets the gate of its next step.
`RoEAdaptiveGate` is a logits processor that changes no logits: vLLM tells it when requests join, leave and move
within the persistent batch, and it moves the gates with them (a request that leaves and comes back, unscheduled
for a step, gets its gate back; a new request starts with the noisy samples on, as the engine's first token).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

FQCN = "roe.vllm.adaptive:RoEAdaptiveGate"
_GATES: dict[int, RoEAdaptiveGate] = {}  # id(vllm_config) -> the engine's gate processor (one per model runner)


def gates_for(vllm_config) -> RoEAdaptiveGate:
    gates = _GATES.get(id(vllm_config))
    if gates is None or gates.config is not vllm_config:
        raise RuntimeError("roe: adaptive K found no gate state for this engine (its logits processor is missing)")
    return gates


class RoEAdaptiveGate(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.config = vllm_config
        size = vllm_config.scheduler_config.max_num_seqs
        self.gate = torch.ones(size, dtype=torch.bool, device=device)  # [max_num_seqs] by persistent batch index
        self.requests: dict[int, list] = {}  # index -> the request's output-token list (its identity: the request)
        self.parked: OrderedDict[int, tuple[list, torch.Tensor]] = OrderedDict()  # requests that left the batch
        self.park_limit = 4 * size
        _GATES[id(vllm_config)] = self

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:  # vLLM's order: removed, added, moved
            tokens = self.requests.pop(index, None)
            if tokens is not None:
                self.parked[id(tokens)] = (tokens, self.gate[index].clone())
                while len(self.parked) > self.park_limit:  # finished requests are parked too: keep the newest
                    self.parked.popitem(last=False)
        for index, _params, _prompt, tokens in batch_update.added:
            self.requests[index] = tokens
            back = self.parked.pop(id(tokens), None)
            self.gate[index] = True if back is None else back[1]
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.gate[[a, b]] = self.gate[[b, a]]
                self.requests[a], self.requests[b] = self.requests.get(b), self.requests.get(a)
            else:
                self.gate[b] = self.gate[a]
                self.requests[b] = self.requests.pop(a, None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # changes no logits (the model reads and writes the gates)


def known_gates(vllm_config, query_lens: torch.Tensor) -> torch.Tensor:
    """[R] the gate of each sequence's RoE token where it is known before the forward (one scheduled token);
    True (the noisy rows run; the aggregate decides later) where the sequence's chunk is longer."""
    gate = gates_for(vllm_config).gate[: query_lens.numel()].to(query_lens.device)
    return torch.where(query_lens == 1, gate, torch.ones_like(gate))


def combine(vllm_config, adaptive: tuple, aggregated, clean, clean_before, query_lens):
    """The step's log-probs [R, V]: `aggregated` where the gate is on, the clean distribution where it is off;
    then record each sequence's gate for its next token. clean [R, V]: the clean logits at the RoE tokens;
    clean_before [R, V]: at the row before them (read where the chunk is longer than one token)."""
    import torch.nn.functional as F

    from ..engine import uncertain

    gates = gates_for(vllm_config)
    R = clean.shape[0]
    stored = gates.gate[:R].to(clean.device)
    gate = torch.where(query_lens.to(clean.device) == 1, stored, uncertain(clean_before, *adaptive))
    out = torch.where(gate[:, None], aggregated, F.log_softmax(clean.float(), dim=-1))
    gates.gate[:R] = uncertain(clean, *adaptive).to(gates.gate.device)
    return out
