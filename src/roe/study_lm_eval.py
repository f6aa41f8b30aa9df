"""`roe study` on lm-eval tasks: one evaluation through lm-eval's `simple_evaluate` with the `roe` model over the
study's roster, read back per item from lm-eval's logged samples (the first metric of the task)."""

from __future__ import annotations

import time


def _per_item(samples: list[dict]) -> tuple[str, list[float], list[float] | None]:
    """(metric, values, weights): weights for metrics lm-eval logs as (log-likelihood, count) pairs, which
    become (negative log-likelihood, count) so that they compare like `roe study`'s perplexity."""
    samples = sorted(samples, key=lambda x: x["doc_id"])
    metric = samples[0]["metrics"][0]
    raw = [x[metric] for x in samples]
    if isinstance(raw[0], (list, tuple)):
        return metric, [-float(ll) for ll, _ in raw], [float(n) for _, n in raw]
    return metric, [float(v) for v in raw], None


def score_lm_eval(roster, spec) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .harness import RoELM

    start = time.perf_counter()
    manager = TaskManager(include_path=spec.include_path) if spec.include_path else TaskManager()
    out = lm_eval.simple_evaluate(model=RoELM.from_roster(roster), tasks=[spec.name], limit=spec.limit,
                                  log_samples=True, task_manager=manager, verbosity="ERROR")
    samples = out.get("samples", {}).get(spec.name)
    if not samples:
        raise ValueError(f"lm-eval task {spec.name!r} logged no samples of its own (a group? name its subtasks)")
    metric, values, weights = _per_item(samples)
    key = next(k for k in out["results"][spec.name] if k.split(",")[0] == metric)
    higher = bool(out["higher_is_better"][spec.name].get(metric, True))
    return {"metric": metric, "value": float(out["results"][spec.name][key]), "values": values, "weights": weights,
            "higher_is_better": higher, "seconds": round(time.perf_counter() - start, 3), "generated_tokens": 0}
