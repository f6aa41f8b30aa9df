"""`roe tune`: search the per-layer tau vector with Optuna's TPE sampler, on the validation split only.

The middle MoE layers (all but `skip_layers` at each end) each get a tau in [0, max_tau]. The first trial is
tau = 0 everywhere (the base model), so the search always knows the score to beat. With --tune-threshold the
adaptive-K threshold of --adaptive-metric is a parameter too: entropy in [0, ln V] nats, margin in [0, 1]
(the first trial puts it where no token is skipped). The objective is quality alone: a threshold that skips
tokens wins only where skipping them does not cost quality (the cost side is `roe bench` / `roe study`'s).
"""

import json
import math
import platform
import time
from pathlib import Path

from .evaluate import EVALUATORS, load_items


def threshold_range(roster) -> tuple[float, float]:
    """The adaptive-K threshold's search range for the roster's metric."""
    metric = roster.config.adaptive_metric
    if metric is None:
        raise ValueError("--tune-threshold needs --adaptive-metric entropy or margin")
    if metric == "margin":
        return 0.0, 1.0
    from .score import logit_width

    return 0.0, math.log(logit_width(roster.model)[0])  # the entropy of a uniform distribution over the vocabulary


def scorer(task: str, objective: str, items):
    """Returns (score(roster) -> the validation objective, direction). `roe study` tunes with it too."""
    if objective == "ppl":
        from . import tasks

        texts = [{"text": tasks.TASKS[task].document(ex)} for ex in items] if task in tasks.TASKS else items
        direction = "minimize"

        def score(r):
            return EVALUATORS["ppl"](r, texts).value
    elif objective == "accuracy":
        if task == "ppl":
            raise ValueError("objective 'accuracy' needs a task with answers (math, choice or code), not ppl")
        direction = "maximize"

        def score(r):
            return EVALUATORS[task](r, items).value
    else:
        raise ValueError(f"objective must be ppl or accuracy, got {objective!r}")
    return score, direction


def objective_fn(roster, task: str, objective: str, items, middle: list[int], max_tau: float,
                 thresholds: tuple[float, float] | None = None):
    """Returns (optuna objective, direction). thresholds: the adaptive-K threshold's range, when it is tuned."""
    n_layers = len(roster.routers)
    score, direction = scorer(task, objective, items)

    def fn(trial):
        taus = [0.0] * n_layers
        for i in middle:
            taus[i] = trial.suggest_float(f"tau_{i}", 0.0, max_tau)
        changes = {"tau": taus}
        if thresholds is not None:
            changes["adaptive_threshold"] = trial.suggest_float("adaptive_threshold", *thresholds)
        value = score(roster.with_config(**changes))
        trial.set_user_attr("tau", taus)
        return value

    return fn, direction


def plots(study, middle: list[int], out_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in study.trials if t.value is not None]
    values = [t.value for t in trials]
    best = (min if study.direction.name == "MINIMIZE" else max)
    running = [best(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(values)), values, "o", ms=3, alpha=0.6, label="trial")
    ax.plot(range(len(values)), running, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation objective")
    ax.legend()
    fig.tight_layout()
    history = out_prefix.with_name(out_prefix.stem + "_history.png")
    fig.savefig(history, dpi=100)

    order = sorted(range(len(trials)), key=lambda i: values[i], reverse=study.direction.name == "MAXIMIZE")
    grid = [[trials[i].user_attrs["tau"][m] for m in range(len(trials[i].user_attrs["tau"]))] for i in order]
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("trial (best first)")
    fig.colorbar(im, label="tau")
    fig.tight_layout()
    heat = out_prefix.with_name(out_prefix.stem + "_tau_heatmap.png")
    fig.savefig(heat, dpi=100)
    return [history, heat]


def cmd_tune(args) -> int:
    import optuna
    import torch
    import transformers
    from .options import load_roster
    from .progress import progress
    from .routing import NOISE_VERSION

    if args.tune_threshold and args.adaptive_threshold is None and args.adaptive_metric in ("entropy", "margin"):
        args.adaptive_threshold = 0.0 if args.adaptive_metric == "entropy" else 1.0  # a start; the search sets it
    roster = load_roster(args)
    n = len(roster.routers)
    middle = list(range(args.skip_layers, n - args.skip_layers))
    if not middle:
        raise ValueError(f"--skip-layers {args.skip_layers} leaves no layer to tune (the model has {n} MoE layers)")
    if not 0 < args.max_tau:
        raise ValueError("--max-tau must be > 0")
    items = load_items(args.task, "validation", args.val_examples, args.file)
    thresholds = threshold_range(roster) if args.tune_threshold else None
    fn, direction = objective_fn(roster, args.task, args.objective, items, middle, args.max_tau, thresholds)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=args.seed),
                                storage=args.storage, study_name=args.study_name, load_if_exists=bool(args.storage))
    todo = max(0, args.trials - len(study.trials))
    if not study.trials:
        first = {f"tau_{i}": 0.0 for i in middle}
        if thresholds is not None:  # where no token is skipped (at tau = 0 it changes nothing anyway)
            first["adaptive_threshold"] = thresholds[1] if roster.config.adaptive_metric == "margin" else 0.0
        study.enqueue_trial(first)
    bar = progress(total=todo, desc="tune")

    def progress(study, trial):
        bar.update(1)
        if trial.value is not None:
            bar.set_postfix(best=f"{study.best_value:.4f}")

    start = time.time()
    try:
        study.optimize(fn, n_trials=todo, callbacks=[progress])
    except KeyboardInterrupt:
        print("interrupted: writing the best profile found so far")
    finally:
        bar.close()
    best = study.best_trial
    base = next((t.value for t in study.trials if t.value is not None
                 and all(v == 0 for n, v in t.params.items() if n.startswith("tau_"))), None)
    profile = {
        "model": args.model,
        "model_type": roster.model.config.model_type,
        "num_samples": roster.config.num_samples,
        "tau": best.user_attrs["tau"],
        "skip_layers": args.skip_layers,
        "aggregate": roster.config.aggregate,
        "cache": roster.config.cache,
        "seed": roster.config.seed,
        "adaptive_metric": roster.config.adaptive_metric,
        "adaptive_threshold": best.params.get("adaptive_threshold", roster.config.adaptive_threshold),
        "noise_version": NOISE_VERSION,  # which Gumbel draw each (seed, position, sample, layer, expert) gets
        "task": args.task,
        "objective": args.objective,
        "validation_score": best.value,
        "validation_score_base": base,
        "validation_examples": len(items),
        "trials": len(study.trials),
        "max_tau": args.max_tau,
        "seconds": round(time.time() - start, 1),
        "versions": {"roe": __import__("roe").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "optuna": optuna.__version__,
                     "python": platform.python_version()},
    }
    out = Path(args.output)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    pngs = plots(study, middle, out)
    print(json.dumps({k: profile[k] for k in ("tau", "validation_score", "validation_score_base", "trials")}))
    print(f"wrote {out}, {', '.join(map(str, pngs))}")
    return 0 if math.isfinite(best.value) else 1


def add_parser(sub) -> None:
    from .options import add_roe_options

    p = sub.add_parser("tune", help="search the per-layer tau vector (Optuna TPE) on the validation split")
    add_roe_options(p)
    p.set_defaults(skip_layers=1)
    p.add_argument("--task", default="math", choices=list(EVALUATORS))
    p.add_argument("--file", help="your own validation items (JSONL, or text for ppl) instead of the built-in split")
    p.add_argument("--objective", default="ppl", choices=["ppl", "accuracy"])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--max-tau", type=float, default=0.5)
    p.add_argument("--tune-threshold", action="store_true",
                   help="tune the adaptive-K threshold of --adaptive-metric along with tau")
    p.add_argument("--val-examples", type=int, default=100)
    p.add_argument("--storage", help="an Optuna storage URL, e.g. sqlite:///study.db, to resume a study")
    p.add_argument("--study-name", default="roe-tune")
    p.add_argument("-o", "--output", default="tuned.json")
    p.set_defaults(func=cmd_tune)
