"""The FastAPI app: routes, the error format, the API key, the access log, and the request body's bounds.

Abuse bounds. The request body is read up to a limit derived from --max-prompt-tokens (413 beyond it, before
anything is parsed); a prompt's characters are bounded before it is tokenized (a prompt of at most N tokens has at
most N x the longest vocabulary entry's characters); tokenization runs on its own thread (`serving_engine.py`).
"""

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ValidationError

from .cli_args import Limits
from .protocol import (APIError, ChatRequest, CompletionRequest, error_body, lone_surrogate, model_not_found,
                       validation_message)
from .scheduler import Scheduler
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion

log = logging.getLogger("roe.server")

BODY_SLACK = 64 << 10  # request-body bytes allowed on top of the prompts (the other fields)


class Gate:
    """Pure ASGI middleware: the API key (constant-time compare), the access log, and a JSON 500 for any
    unhandled error (a handler bug never shows a traceback to the client)."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [None]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.expected is not None and scope["path"] != "/health" and not self._authorized(scope):
            await send_json(send_, 401, error_body("missing or wrong API key (send 'Authorization: Bearer <key>')",
                                                   "authentication_error"))
            log.info("%s %s %d - %.0fms", scope["method"], scope["path"], 401, 1000 * (time.perf_counter() - start))
            return
        try:
            await self.app(scope, receive, send_)
        except Exception:
            log.exception("unhandled error")
            if status[0] is None:
                await send_json(send_, 500, error_body("internal server error", "server_error"))
        tokens = scope.get("state", {}).get("tokens", "-")
        log.info("%s %s %s tokens=%s %.0fms", scope["method"], scope["path"], status[0], tokens,
                 1000 * (time.perf_counter() - start))

    def _authorized(self, scope) -> bool:
        """`Authorization: Bearer <key>`, the scheme in any case (RFC 9110: schemes are case-insensitive)."""
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, key = given.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.expected)


async def send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request, max_body: int) -> bytes:
    """The request body, refused with 413 past `max_body` bytes (by its Content-Length, or as it arrives)."""
    from starlette.requests import ClientDisconnect

    too_large = APIError(413, f"the request body is larger than this server's limit of {max_body} bytes "
                              "(derived from --max-prompt-tokens)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body):
        raise too_large if length.isdigit() else APIError(400, "the Content-Length header is not a number")
    parts, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise too_large
            parts.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection before sending the whole body") from None
    return b"".join(parts)


def parse_body(data: bytes, model: type[BaseModel]):
    """JSON, then the request model; every failure is an OpenAI-format 400."""
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, NaN/Infinity, nested too deep
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if b"\\u" in data and (found := lone_surrogate(body)):  # (a JSON escape can spell half a surrogate pair)
        where, index, escape = found
        raise APIError(400, f"{where}: character {index} is {escape}, half of a UTF-16 surrogate pair with no other "
                            "half, so not text; send the character itself or both halves", param=where)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None


def max_body_bytes(limits: Limits, max_prompt_chars: int) -> int:
    """Room for a full list of token-id prompts (<= 8 bytes an id), plus one prompt of the longest possible text
    with every character escaped (6 bytes each), plus the other fields."""
    return BODY_SLACK + limits.max_prompts * limits.max_prompt_tokens * 8 + 6 * max_prompt_chars


def create_app(roster, model_name: str = "roe", limits: Limits | None = None, api_key: str | None = None):
    from fastapi import FastAPI

    limits = limits or Limits()
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    scheduler = Scheduler(roster, limits)
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roe-tokenize")

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()  # (already closed by `roe serve`'s shutdown, which also joins the worker)
        tokenizing.shutdown(wait=False)

    app = FastAPI(title="roster-of-experts", version="0.1.0", lifespan=lifespan, **docs)
    completion = OpenAIServingCompletion(roster, model_name, limits, scheduler, tokenizing)
    chat = OpenAIServingChat(roster, model_name, limits, scheduler, tokenizing)
    app.state.scheduler = scheduler
    app.state.max_prompt_chars = completion.max_prompt_chars
    app.state.max_body_bytes = max_body_bytes(limits, completion.max_prompt_chars)
    app.add_middleware(Gate, api_key=api_key)
    _add_error_handlers(app)
    _add_routes(app, model_name, completion, chat)
    return app


def _add_error_handlers(app) -> None:
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def error(status, message, kind="invalid_request_error", param=None, headers=None, code=None):
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.param, exc.headers, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return error(exc.status_code, message, kind, headers=getattr(exc, "headers", None))


def _add_routes(app, model_name: str, completion: OpenAIServingCompletion, chat: OpenAIServingChat) -> None:
    from fastapi import Request

    scheduler = app.state.scheduler
    started = int(time.time())

    async def parse(request: Request, model: type[BaseModel]):
        return parse_body(await read_body(request, app.state.max_body_bytes), model)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": len(scheduler.jobs), "running": len(scheduler.running)}

    card = {"id": model_name, "object": "model", "created": started, "owned_by": "roe"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise model_not_found(model_id, model_name)
        return card

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion.create(await parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat.create(await parse(request, ChatRequest), request)
