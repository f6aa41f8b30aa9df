"""The argument parsers of the `roe` subcommands whose modules are heavy (torch, transformers, the web stack).

`roe --help`, `roe bench --help` and argument errors answer from here without importing those modules: each
parser's `func` imports its module only when the subcommand runs (`lazy`). A module's own `add_parser` still
works (it calls the one here).
"""

from __future__ import annotations

import importlib

from .builtin import BUILTIN_DIR, SIZES
from .options import add_roe_options


def lazy(module: str, function: str):
    """A subcommand's `func` that imports `roe.<module>` when it runs, not when the parser is built."""

    def run(args):
        return getattr(importlib.import_module(f".{module}", __package__), function)(args)

    run.__name__ = function
    return run


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency, throughput and memory of RoE against the base model")
    add_roe_options(p, k_list=True, cache_list=True)  # includes --compile (RoE rows; hf-compiled compiles itself)
    if "--compile" not in p._option_string_actions:
        p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--independent-k", default="8", help="K values for the K-independent-passes baseline")
    p.add_argument("--naive-k", default="8", help="K values for the no-cache baseline (slow: keep small)")
    p.add_argument("--naive-tokens", type=int, default=16, help="new tokens for the no-cache baseline")
    p.add_argument("--batch-sizes", default="1,16", help="prompts decoded together, comma-separated; each size "
                   "above 1 adds a row set (base, hf-eager, hf-compiled, RoE at --batch-k) (default: 1,16)")
    p.add_argument("--batch-k", default="8", help="K values of the batched RoE rows (default: 8)")
    p.add_argument("--no-hf", action="store_true", help="leave out the hf-eager and hf-compiled rows "
                   "(transformers' own generate)")
    p.add_argument("--experts-impls", default="", help="also measure these transformers experts implementations "
                   "(eager, batched_mm, grouped_mm), comma-separated")
    p.add_argument("--ablations", action="store_true", help="also measure RoE with each engine optimisation "
                   "switched off (the before/after rows)")
    p.add_argument("--repeats", type=int, default=1, help="measure every row this many times (interleaved) and "
                   "keep the median")
    p.add_argument("--json", help="write the rows as JSON (rewritten after every measurement while the run lasts)")
    p.set_defaults(func=lazy("bench", "cmd_bench"))


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_roe_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--api-key", help="require this bearer token (or set ROE_API_KEY); also hides /docs")
    p.add_argument("--max-k", type=int, default=64)
    p.add_argument("--max-tokens", type=int, help="new tokens per completion at most (default: 512, or less to fit "
                                                  "the model's context)")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt tokens at most (default: 2048, or less to fit the "
                                                         "model's context); also bounds the request body")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--timeout-graceful-shutdown", type=float, default=10.0,
                   help="on SIGTERM, seconds to let running requests finish (queued ones answer 503 at once)")
    p.add_argument("--timeout-header", type=float, default=10.0,
                   help="seconds from a request's first byte to the end of its headers (408 after; default 10)")
    p.add_argument("--timeout-body", type=float, default=30.0,
                   help="seconds from the end of a request's headers to the end of its body (408 after; default 30)")
    p.add_argument("--timeout-idle", type=float, default=5.0,
                   help="seconds a connection may stay open without a request (closed after; default 5)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most; one more is answered 503 at once (default 256)")
    p.set_defaults(func=lazy("server", "cmd_serve"))


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="RoE against the base and a larger model on the built-in tasks")
    p.add_argument("--limit", type=int, default=100, help="test items per category")
    p.add_argument("--example", type=int, default=0, help="which test math problem to show worked")
    p.set_defaults(func=lazy("demo", "cmd_demo"))


def add_train(sub) -> None:
    p = sub.add_parser("train-builtin", help="train a built-in model size on the task suite")
    p.add_argument("--size", default="s", help=f"one of {', '.join(SIZES)} (comma-separated for several)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--out", default=str(BUILTIN_DIR), help="family folder (default: the package's builtin_models)")
    p.set_defaults(func=lazy("train", "cmd_train"))
