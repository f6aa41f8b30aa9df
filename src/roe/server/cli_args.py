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
    """`roe serve`'s options: defined in roe.parsers, which `roe --help` reads without importing the server."""
    from ..parsers import add_serve

    add_serve(sub)
