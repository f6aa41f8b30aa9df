"""`roe serve`'s flags and the limits they set (argparse only: nothing heavy is imported here)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_k: int = 64
    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_queue: int = 64
    max_batch: int = 16
    max_n: int = 8
    max_prompts: int = 64  # prompts in one /v1/completions request


def serve_limits(args, max_context: int | None) -> Limits:
    """The limits from the flags; --max-tokens and --max-prompt-tokens default to what fits the model's context."""
    ctx = max_context
    room = None if ctx is None else ctx - 1  # at least one prompt token and one new token
    max_tokens = args.max_tokens if args.max_tokens is not None else min(512, room or 512)
    max_prompt = args.max_prompt_tokens if args.max_prompt_tokens is not None else min(2048, room or 2048)
    for flag, value in (("--max-tokens", max_tokens), ("--max-prompt-tokens", max_prompt)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
        if room is not None and value > room:
            raise ValueError(f"{flag} {value} can never be served: the model's whole context is {ctx} tokens "
                             f"(at most {room})")
    return Limits(max_k=args.max_k, max_tokens=max_tokens, max_prompt_tokens=max_prompt, max_queue=args.max_queue)


def add_parser(sub) -> None:
    from ..options import add_roe_options
    from .api_server import cmd_serve

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
    p.set_defaults(func=cmd_serve)
