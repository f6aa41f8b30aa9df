"""The `roe` command.

Each subcommand's module is imported only when that subcommand runs: `roe --help` imports none of them,
`roe bench --help` and a mistyped flag import neither torch nor transformers (the parsers of the heavy
subcommands live in `roe.parsers`), and `roe bench ...` imports only `roe.bench` (so bench runs on a machine with
PyTorch and transformers but without the server's FastAPI/pydantic, Optuna or matplotlib). The options the subcommands share live in `roe.options`;
no module imports this one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .options import add_roe_options  # noqa: E402  (light: argparse only)

# subcommand -> (the module, in this package, whose add_parser(sub) defines it, or "module:function" naming the
# function; None: defined here), one-line help. The heavy modules' parsers live in `roe.parsers`, so that their
# --help and argument errors import neither torch nor transformers (the module loads when the subcommand runs).
COMMANDS = {
    "generate": (None, "generate text with RoE"),
    "export-tasks": (None, "write the built-in task suite as JSONL (GSM8K format for math) and text"),
    "demo": ("parsers:add_demo", "RoE against the base and a larger model on the built-in tasks"),
    "train-builtin": ("parsers:add_train", "train a built-in model size on the task suite"),
    "eval": ("evaluate", "evaluate base (K=1) against RoE on a task"),
    "tune": ("tune", "search the per-layer tau vector (Optuna TPE) on the validation split"),
    "bench": ("parsers:add_bench", "latency, throughput and memory of RoE against the base model"),
    "serve": ("parsers:add_serve", "OpenAI-compatible HTTP server"),
    # study20: the paper's protocol in one command
    "study": ("study", "does RoE help? tune, test against the base model with paired CIs, cost"),
}


def cmd_generate(args) -> int:
    from .generate import SamplingParams
    from .options import load_roster

    if args.n < 1:
        raise ValueError(f"-n must be at least 1, got {args.n}")
    if not args.prompt:  # checked here too, so that an empty prompt fails before the model loads
        raise ValueError("the prompt is empty: give at least one character of text")
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, stop=args.stop or None)
    if args.do_sample:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    SamplingParams(**kw)  # the same checks generate makes, before loading
    roster = load_roster(args)
    if args.n > 1:  # n completions of the one prompt, each with its own seed
        for i, text in enumerate(roster.generate(args.prompt, n=args.n, **kw)):
            print(f"--- completion {i + 1} of {args.n} ---")
            print(text)
    elif sys.stdout.isatty() and not args.no_stream:
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


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help=COMMANDS["generate"][1])
    g.add_argument("prompt")
    add_roe_options(g)
    g.add_argument("-n", type=int, default=1, help="completions of the prompt, each with its own seed (default: 1)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-stream", action="store_true", help="print the whole text at the end even in a terminal")
    g.set_defaults(func=cmd_generate)


def _add_export_tasks(sub) -> None:
    x = sub.add_parser("export-tasks", help=COMMANDS["export-tasks"][1])
    x.add_argument("--out", required=True)
    x.add_argument("-n", type=int, default=500, help="items per task and split")
    x.add_argument("--seed", type=int, default=0)
    x.set_defaults(func=cmd_export_tasks)


LOCAL = {"generate": _add_generate, "export-tasks": _add_export_tasks}


def _command_in(argv) -> str | None:
    """The subcommand argv names (the first word that is not an option), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `roe` parser with `command`'s full subparser (its module imported); the other subcommands are listed
    with their help only. command=None: every subcommand in full (imports all their modules)."""
    parser = argparse.ArgumentParser(prog="roe", description="Roster of Experts: hyper-parallel inference for MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help, add_help=False)  # a placeholder: never parsed (argv names `command`)
        elif module is None:
            LOCAL[name](sub)
        else:
            module, _, function = module.partition(":")
            try:
                mod = importlib.import_module(f".{module}", __package__)
            except ModuleNotFoundError as e:
                parser.error(f"`roe {name}` needs the Python package {e.name!r}, which is not installed")
            getattr(mod, function or "add_parser")(sub)
    return parser


def _top_parser() -> argparse.ArgumentParser:
    """`roe` without a known subcommand: every subcommand listed, none imported."""
    return build_parser(command="")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser(command) if command else _top_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        print(f"error: `roe {args.command}` needs the Python package {e.name!r}, which is not installed", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
