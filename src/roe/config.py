"""RoEConfig: the settings of one Roster of Experts, validated when made."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SEED_RANGE = (0, 1 << 63)  # seeds are stored as int64 tensors and must be non-negative for the noise hash

AGGREGATES = ("probs", "logits", "logprobs")
CACHES = ("clean", "full")
# adaptive K: the clean path's uncertainty that decides whether a token's noisy samples take effect (engine.py)
ADAPTIVE_METRICS = ("entropy", "margin")


# the settings a profile JSON may carry (written by `roe tune`)
PROFILE_FIELDS = ("num_samples", "tau", "skip_layers", "aggregate", "cache", "seed", "adaptive_metric",
                  "adaptive_threshold")


@dataclass(frozen=True)
class RoEConfig:
    num_samples: int = 8  # K >= 1; K = 1 is exactly the base model
    tau: float | Sequence[float] = 0.3  # one tau for every noisy MoE layer, or one value per MoE layer
    skip_layers: int = 1  # with a float tau: the first and last `skip_layers` MoE layers stay clean
    aggregate: str = "probs"  # mean of softmax (the paper's), mean of logits, or mean of log-softmax
    cache: str = "clean"  # one shared clean KV cache, or one cache per sample
    seed: int = 0
    adaptive_metric: str | None = None  # adaptive K: None (every token runs its K-1 noisy samples), "entropy", "margin"
    adaptive_threshold: float | None = None  # noisy samples run where entropy > it (nats) or top-2 margin < it
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # provenance from a profile

    def __post_init__(self):
        k = self.num_samples
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_samples (K) must be an integer >= 1, got {k!r}")
        taus = [self.tau] if isinstance(self.tau, (int, float)) else self.tau
        if isinstance(self.tau, str) or not isinstance(taus, Sequence):
            raise ValueError(f"tau must be a number or a sequence of numbers, got {self.tau!r}")
        for t in taus:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ValueError(f"tau values must be finite numbers, got {t!r}")
            if t < 0:
                raise ValueError(f"tau must be >= 0 (0 is the model's own routing), got {t}")
        if not isinstance(self.tau, (int, float)):
            if len(taus) == 0:
                raise ValueError("tau is an empty list: give one value per MoE layer or a single float")
            object.__setattr__(self, "tau", tuple(float(t) for t in taus))
        if isinstance(self.skip_layers, bool) or not isinstance(self.skip_layers, int) or self.skip_layers < 0:
            raise ValueError(f"skip_layers must be an integer >= 0, got {self.skip_layers!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        self._check_adaptive()

    def _check_adaptive(self) -> None:
        metric, threshold = self.adaptive_metric, self.adaptive_threshold
        if metric is None:
            if threshold is not None:
                raise ValueError("adaptive_threshold is set but adaptive_metric is not: give adaptive_metric "
                                 f"({' or '.join(ADAPTIVE_METRICS)}) too")
            return
        if metric not in ADAPTIVE_METRICS:
            raise ValueError(f"adaptive_metric must be one of {', '.join(ADAPTIVE_METRICS)} or None, got {metric!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"adaptive_metric={metric!r} needs a finite number adaptive_threshold, got {threshold!r}")
        if metric == "entropy" and threshold < 0:
            raise ValueError(f"adaptive_threshold for entropy is in nats and must be >= 0, got {threshold}")
        if metric == "margin" and not 0 <= threshold <= 1:
            raise ValueError(f"adaptive_threshold for margin is a probability gap in [0, 1], got {threshold}")
        if self.cache != "clean":
            raise ValueError("adaptive_metric needs cache='clean': under the full cache a skipped token's noisy "
                             "rows keep their own history, so they would not equal the clean row")
        object.__setattr__(self, "adaptive_threshold", float(threshold))

    def replace(self, **changes) -> RoEConfig:
        unknown = set(changes) - {f for f in self.__dataclass_fields__ if f != "extra"}
        if unknown:
            raise ValueError(f"unknown RoE setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        if isinstance(d["tau"], tuple):
            d["tau"] = list(d["tau"])
        return d

    @classmethod
    def from_profile(cls, path: str | Path, **overrides) -> RoEConfig:
        """Load a tuned profile JSON (as written by `roe tune`); keyword arguments override it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"profile not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or "tau" not in data:
            raise ValueError(f"profile {path} must be a JSON object with at least 'tau' (and usually 'num_samples')")
        fields = {k: data[k] for k in PROFILE_FIELDS if k in data}
        fields.update(overrides)
        return cls(**fields, extra={"profile": str(path), **{k: v for k, v in data.items() if k not in fields}})
