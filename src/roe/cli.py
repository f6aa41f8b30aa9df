"""The `roe` command."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    p.add_argument("--device", default="cpu")
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
    return base.replace(**changes)


def load_roster(args, k=None):
    from .builtin import resolve_model
    from .roster import RosterOfExperts

    _, default = resolve_model(args.model)
    cfg = roe_config(args, default, k)
    return RosterOfExperts.from_pretrained(args.model, roe=cfg, device=args.device, trust_remote_code=args.trust_remote_code)


def cmd_generate(args) -> int:
    roster = load_roster(args)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, stop=args.stop or None)
    if args.do_sample:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    if sys.stdout.isatty() and not args.no_stream:
        for piece in roster.stream(args.prompt, **kw):
            print(piece, end="", flush=True)
        print()
    else:
        print(roster.generate(args.prompt, **kw)[0])
    return 0


def cmd_export_tasks(args) -> int:
    from .tasks import export_jsonl

    for path in export_jsonl(args.out, args.n, args.seed):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roe", description="Roster of Experts: hyper-parallel inference for MoE models")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with RoE")
    g.add_argument("prompt")
    add_roe_options(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-stream", action="store_true", help="print the whole text at the end even in a terminal")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export-tasks", help="write the built-in task suite as JSONL (GSM8K format for math) and text")
    x.add_argument("--out", required=True)
    x.add_argument("-n", type=int, default=500, help="items per task and split")
    x.add_argument("--seed", type=int, default=0)
    x.set_defaults(func=cmd_export_tasks)

    from . import bench, demo, evaluate, server, train, tune

    for module in (demo, train, evaluate, tune, bench, server):
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
