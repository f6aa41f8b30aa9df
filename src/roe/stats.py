"""Paired comparison of RoE against the base model on the same items: the mean per-item difference, a bootstrap
confidence interval (scipy's `bootstrap`, resampling items, so the pairing is kept) and a verdict.

An item's RoE value is its mean over seeds (the seeds are RoE's noise; the base model has none), so the
interval is over items: what another draw of items from the same task would give, with RoE's seed noise
averaged in. For perplexity-like metrics an item carries a weight (its token count): the values are summed
negative log-probs and the statistic is sum(difference) / sum(tokens), i.e. exactly the difference of the
log-perplexities of the whole set, RoE minus base.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np

VERDICTS = ("helps", "no evidence", "hurts")


def _ratio(d, w, axis=-1):
    return d.sum(axis=axis) / w.sum(axis=axis)


def _rng_kwargs(seed: int) -> dict:
    """scipy >= 1.15 takes `rng`; older releases `random_state`."""
    params = inspect.signature(_bootstrap()).parameters
    return {"rng": np.random.default_rng(seed)} if "rng" in params else {"random_state": np.random.default_rng(seed)}


def _bootstrap():
    from scipy.stats import bootstrap

    return bootstrap


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """helps / hurts when the whole interval lies on one side of 0, else no evidence."""
    if low > 0 or high < 0:
        better = low > 0 if higher_is_better else high < 0
        return "helps" if better else "hurts"
    return "no evidence"


def per_item_difference(roe, base) -> np.ndarray:
    """roe [items] or [items, seeds], base [items] (or [items, 1]) -> [items]: the seed mean of RoE minus base."""
    roe, base = np.asarray(roe, dtype=float), np.asarray(base, dtype=float)
    roe = roe.mean(axis=1) if roe.ndim == 2 else roe
    base = base.mean(axis=1) if base.ndim == 2 else base
    if roe.shape != base.shape:
        raise ValueError(f"RoE has {roe.shape[0]} items but the base model {base.shape[0]}: they must be the same items")
    return roe - base


def paired_difference(roe, base, weights=None, level: float = 0.95, higher_is_better: bool = True,
                      n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean per-item difference RoE minus base (weighted by `weights` if given), its bootstrap CI at `level`
    (BCa; the percentile interval where BCa is undefined) and the verdict."""
    if not 0 < level < 1:
        raise ValueError(f"the confidence level must be in (0, 1), got {level}")
    d = per_item_difference(roe, base)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != d.shape or (w <= 0).any():
        raise ValueError("weights must be one positive number per item")
    if len(d) < 2:
        raise ValueError(f"a paired bootstrap needs at least 2 items, got {len(d)}")
    mean = float(_ratio(d, w))
    method = "BCa"
    if np.ptp(d / w) == 0:  # every item differs by the same amount: no spread to resample
        low = high = mean
        method = "none (all items differ equally)"
    else:
        low, high = _interval(d, w, level, n_resamples, seed, "BCa")
        if not (math.isfinite(low) and math.isfinite(high)):
            method = "percentile (BCa undefined)"
            low, high = _interval(d, w, level, n_resamples, seed, "percentile")
    return {"n": int(len(d)), "mean": mean, "ci_low": low, "ci_high": high, "level": level, "method": method,
            "n_resamples": n_resamples, "higher_is_better": higher_is_better,
            "verdict": verdict(low, high, higher_is_better)}


def _interval(d, w, level, n_resamples, seed, method) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on degenerate resamples; a nan interval is handled above
        res = _bootstrap()((d, w), _ratio, paired=True, vectorized=True, n_resamples=n_resamples,
                           confidence_level=level, method=method, **_rng_kwargs(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
