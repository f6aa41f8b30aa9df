"""`roe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with RoE settings per request.

Laid out as vLLM's `entrypoints/openai`; a request's path through the files:

  cli_args.py            the `roe serve` flags and the limits they set
  api_server.py          `roe serve`'s entry point: the uvicorn server, its shutdown
  app.py                 the FastAPI app: routes, the error format, the API key, the access log, the body's bounds
  protocol.py            request bodies and their validation (what needs no model), the error format
  serving_engine.py      what both endpoints share: settings against the limits, prompt checks and tokenization
                         (off the event loop), submitting jobs, waiting for them, streaming them (SSE)
  serving_completion.py  POST /v1/completions (text or token-id prompts, logprobs, echo)
  serving_chat.py        POST /v1/chat/completions (the chat template)
  scheduler.py           the model worker thread: FIFO queue, batching of jobs that share settings, decoding
  scoring.py             teacher-forced log-probs for `echo` (the generation loop's semantics)

RoE settings travel in an extra `roe` object, which the `openai` client sends with `extra_body={"roe": {...}}`.
"""

from .app import create_app  # (first: pydantic is the package a missing server stack is reported by)
from .api_server import cmd_serve, make_server, serve  # noqa: I001
from .cli_args import Limits, add_parser, serve_limits
from .protocol import APIError, ChatMessage
from .scoring import score_positions
from .serving_chat import chat_prompt

__all__ = ["APIError", "ChatMessage", "Limits", "add_parser", "chat_prompt", "cmd_serve", "create_app", "make_server",
           "score_positions", "serve", "serve_limits"]
