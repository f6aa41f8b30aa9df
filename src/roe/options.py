"""The RoE settings every `roe` subcommand shares, and loading a roster from them.

Subcommand modules import this module, never `roe.cli` (which imports a subcommand's module only when it runs),
so the import graph has no loop and `roe bench` never imports the server's web stack. Nothing heavy at the top:
torch and transformers load inside `load_roster`.
"""

from __future__ import annotations

import argparse

COMPILE_CHOICES = ("auto", "on", "off")


def parse_tau(text: str):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number or a comma-separated list of numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def add_roe_options(p: argparse.ArgumentParser, k_list: bool = False, cache_list: bool = False) -> None:
    """The RoE settings every command shares; unset ones fall back to --profile, then to the model's default."""
    p.add_argument("--model", default="builtin", help="checkpoint folder, hub id, or builtin[:s|m|l] (default: builtin)")
    p.add_argument("--profile", help="a tuned RoE profile JSON (from `roe tune`)")
    if k_list:
        p.add_argument("-k", "--num-samples", dest="k", help="comma-separated K values, e.g. 1,8,32")
    else:
        p.add_argument("-k", "--num-samples", dest="k", type=int, help="K, the number of routing samples (>= 1)")
    p.add_argument("--tau", type=parse_tau, help="one tau, or one per MoE layer separated by commas")
    p.add_argument("--skip-layers", type=int, help="MoE layers kept clean at each end when tau is one number")
    p.add_argument("--aggregate", choices=["probs", "logits", "logprobs"])
    if cache_list:
        p.add_argument("--cache", dest="caches", default="clean,full", help="comma-separated cache modes to compare")
        p.set_defaults(cache=None)
    else:
        p.add_argument("--cache", choices=["clean", "full"])
    p.add_argument("--seed", type=int)
    p.add_argument("--adaptive-metric", choices=["entropy", "margin", "off"],
                   help="adaptive K: run the noisy samples only on tokens whose clean prediction is uncertain "
                        "(off: every token, overriding a profile)")
    p.add_argument("--adaptive-threshold", type=float,
                   help="adaptive K: noisy samples run where entropy (nats) > it, or top-2 margin < it")
    p.add_argument("--device", default="cpu", help="cpu (the default), cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto",
                   help="auto (the default: the checkpoint's own dtype), bfloat16, float16 or float32")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="compile the decode step: auto (on CUDA, the default), on, or off (eager everywhere)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off by default)")


def roe_config(args, base=None, k=None):
    """The RoEConfig the flags describe, on top of a profile or the model's shipped default."""
    from .config import RoEConfig

    if getattr(args, "profile", None):
        base = RoEConfig.from_profile(args.profile)
    base = base or RoEConfig()
    changes = {
        name: value
        for name, value in (
            ("num_samples", k if k is not None else (args.k if isinstance(args.k, int) else None)),
            ("tau", args.tau),
            ("skip_layers", args.skip_layers),
            ("aggregate", args.aggregate),
            ("cache", args.cache),
            ("seed", args.seed),
        )
        if value is not None
    }
    changes.update(adaptive_changes(getattr(args, "adaptive_metric", None), getattr(args, "adaptive_threshold", None)))
    return base.replace(**changes)


def adaptive_changes(metric, threshold) -> dict:
    """RoEConfig changes for adaptive K from a metric ("off": none, clearing a profile's) and a threshold."""
    if metric == "off":
        if threshold is not None:
            raise ValueError("adaptive threshold given with adaptive metric 'off': drop one of them")
        return {"adaptive_metric": None, "adaptive_threshold": None}
    changes = {"adaptive_metric": metric} if metric is not None else {}
    if threshold is not None:
        changes["adaptive_threshold"] = threshold
    return changes


def load_roster(args, k=None):
    """The roster the flags describe (`k` overrides -k, e.g. the largest K of a list)."""
    from .builtin import resolve_model
    from .roster import RosterOfExperts

    _, default = resolve_model(args.model)
    cfg = roe_config(args, default, k)
    return RosterOfExperts.from_pretrained(args.model, roe=cfg, device=args.device, dtype=getattr(args, "dtype", "auto"),
                                           trust_remote_code=args.trust_remote_code,
                                           compile=getattr(args, "compile", "auto"))
