"""`roe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with RoE settings per request.

One worker thread runs the model. Requests queue in arrival order; when the
worker takes the oldest one it also takes every queued request with the same
RoE settings and sampling parameters (up to `max_batch`) and decodes them as
one batch, each with its own seed. A full queue answers 429 at once.

RoE settings travel in an extra `roe` object, which the `openai` client sends with
`extra_body={"roe": {...}}`. Chat prompts use the tokenizer's chat template, or
this plain one when it has none: "System: ...\\nUser: ...\\nAssistant:" (one line
per message, ending with "Assistant:").
"""


import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import RoEConfig
from .generate import Completion, SamplingParams, decode_steps, new_text
from .routing import layer_taus

log = logging.getLogger("roe.server")


@dataclass(frozen=True)
class Limits:
    max_k: int = 64
    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_queue: int = 64
    max_batch: int = 16
    max_n: int = 8


class RoESettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_samples: int | None = Field(None, ge=1)
    tau: float | list[float] | None = None
    skip_layers: int | None = Field(None, ge=0)
    aggregate: Literal["probs", "logits", "logprobs"] | None = None
    cache: Literal["clean", "full"] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    roe: RoESettings | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return self


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None

    @model_validator(mode="after")
    def _no_logprobs(self):
        if self.logprobs or self.echo:
            raise ValueError("logprobs and echo are not supported")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False

    @model_validator(mode="after")
    def _no_logprobs(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        return self


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    ids: list[int]
    params: SamplingParams
    config: RoEConfig
    seed: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Scheduler:
    """The single model worker: FIFO, batching queued jobs that share settings."""

    def __init__(self, roster, limits: Limits):
        self.roster = roster
        self.limits = limits
        self.jobs: deque[Job] = deque()
        self.rosters: dict[RoEConfig, object] = {}
        self.lock = threading.Condition()
        threading.Thread(target=self._work, daemon=True, name="roe-worker").start()

    def submit(self, jobs: list[Job]) -> None:
        with self.lock:
            if len(self.jobs) + len(jobs) > self.limits.max_queue:
                raise APIError(429, f"the server is busy: {len(self.jobs)} requests queued (limit "
                                    f"{self.limits.max_queue}); retry shortly", "rate_limit_error")
            self.jobs.extend(jobs)
            self.lock.notify()

    def _take_batch(self) -> list[Job]:
        with self.lock:
            while not self.jobs:
                self.lock.wait()
            head = self.jobs.popleft()
            key = (head.config.replace(seed=0), head.params)
            batch = [head]
            for job in list(self.jobs):
                if len(batch) == self.limits.max_batch:
                    break
                if (job.config.replace(seed=0), job.params) == key:
                    self.jobs.remove(job)
                    batch.append(job)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                roster = self._roster_for(batch[0].config)
                sent = [0] * len(batch)
                outs: list[Completion] = []
                for outs in decode_steps(roster, [j.ids for j in batch], batch[0].params, [j.seed for j in batch]):
                    for i, (job, out) in enumerate(zip(batch, outs)):
                        piece = new_text(out, sent[i], job.params.stop)
                        if piece:
                            sent[i] += len(piece)
                            job.put(("delta", piece))
                for job, out in zip(batch, outs):
                    job.put(("done", out))
            except Exception as e:  # a failing batch must not take the server down
                log.exception("generation failed")
                for job in batch:
                    job.put(("error", e))

    def _roster_for(self, config: RoEConfig):
        """The roster for these settings (seeds travel per job), made once per distinct setting."""
        key = config.replace(seed=0)
        if key not in self.rosters:
            c = key.to_dict()
            self.rosters[key] = self.roster.with_config(**c)
        return self.rosters[key]


def create_app(roster, model_name: str = "roe", limits: Limits | None = None, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    limits = limits or Limits()
    app = FastAPI(title="roster-of-experts", version="0.1.0")
    scheduler = Scheduler(roster, limits)
    started = int(time.time())

    def error(status, message, kind="invalid_request_error", param=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON")
        if tuple(first.get("loc", ())) == ("body",):
            return error(400, f"the request body must be a JSON object ({msg})")
        return error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.middleware("http")
    async def _log_and_auth(request: Request, call_next):
        start = time.perf_counter()
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                response = error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                 "authentication_error")
                log.info("%s %s %d - %.0fms", request.method, request.url.path, 401, 1000 * (time.perf_counter() - start))
                return response
        try:
            response = await call_next(request)
        except Exception:  # never let a handler bug crash the server
            log.exception("unhandled error")
            response = error(500, "internal server error", "server_error")
        tokens = getattr(request.state, "tokens", "-")
        log.info("%s %s %d tokens=%s %.0fms", request.method, request.url.path, response.status_code, tokens,
                 1000 * (time.perf_counter() - start))
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": len(scheduler.jobs)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "roe"}]}

    def settings(req: _Common) -> tuple[RoEConfig, SamplingParams, int]:
        if req.model != model_name:
            raise APIError(400, f"unknown model {req.model!r}; this server serves {model_name!r}", param="model")
        changes = req.roe.model_dump(exclude_none=True) if req.roe else {}
        try:
            config = roster.config.replace(**changes)
            if config.num_samples > limits.max_k:
                raise ValueError(f"roe.num_samples is {config.num_samples}; this server allows at most {limits.max_k}")
            layer_taus(config.tau, config.skip_layers, len(roster.routers))  # a tau list must fit the model
            max_tokens = req.max_completion_tokens or req.max_tokens or 16
            if max_tokens > limits.max_tokens:
                raise ValueError(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}")
            if req.n > limits.max_n:
                raise ValueError(f"n is {req.n}; this server allows at most {limits.max_n}")
            sampled = req.temperature > 0
            params = SamplingParams(max_tokens, sampled, req.temperature if sampled else 1.0,
                                    req.top_p if sampled else 1.0, req.stop)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return config, params, req.seed if req.seed is not None else roster.config.seed

    def encode(text: str, max_tokens: int) -> list[int]:
        try:
            ids = roster.encode_prompt(text, max_tokens)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="prompt") from None
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server allows at most {limits.max_prompt_tokens}",
                           param="prompt")
        return ids

    async def run(prompts: list[str], req: _Common, chat: bool, request: Request):
        config, params, seed = settings(req)
        loop = asyncio.get_running_loop()
        jobs = [Job(encode(p, params.max_new_tokens), params, config, seed + i, loop)
                for p in prompts for i in range(req.n)]
        scheduler.submit(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(stream_events(jobs, rid, kind, created, chat, req, request),
                                     media_type="text/event-stream")
        outs = []
        for job in jobs:
            while True:
                tag, item = await job.queue.get()
                if tag == "error":
                    raise APIError(500, f"generation failed: {item}", "server_error")
                if tag == "done":
                    outs.append(item)
                    break
        choices = []
        for i, out in enumerate(outs):
            body = {"message": {"role": "assistant", "content": out.text}} if chat else {"text": out.text, "logprobs": None}
            choices.append({"index": i, **body, "finish_reason": out.finish_reason})
        usage = _usage(jobs, outs)
        request.state.tokens = usage["completion_tokens"]
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices, "usage": usage}

    async def stream_events(jobs, rid, kind, created, chat, req, request):
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(index, text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                                          "choices": [choice]}) + "\n\n"

        outs = []
        for index, job in enumerate(jobs):
            if chat:
                yield event(index, role=True)
            while True:
                tag, item = await job.queue.get()
                if tag == "delta":
                    yield event(index, item)
                elif tag == "done":
                    outs.append(item)
                    yield event(index, finish=item.finish_reason)
                    break
                else:
                    yield "data: " + json.dumps({"error": {"message": f"generation failed: {item}",
                                                           "type": "server_error"}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
        if req.stream_options and req.stream_options.get("include_usage"):
            yield "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                                         "choices": [], "usage": _usage(jobs, outs)}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        return await run(prompts, req, False, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await run([chat_prompt(roster.tokenizer, req.messages)], req, True, request)

    return app


def _usage(jobs: list[Job], outs: list[Completion]) -> dict:
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The tokenizer's chat template, or the plain one documented at the top of this module."""
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    names = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{names[m['role']]}: {m['content']}\n" for m in msgs) + "Assistant:"


def cmd_serve(args) -> int:
    import uvicorn

    from .options import load_roster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    roster = load_roster(args)
    limits = Limits(max_k=args.max_k, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    max_queue=args.max_queue)
    api_key = args.api_key or os.environ.get("ROE_API_KEY")
    app = create_app(roster, args.served_model_name or args.model, limits, api_key)
    log.info("serving %s on http://%s:%d (RoE %s)", args.model, args.host, args.port, roster.config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_parser(sub) -> None:
    from .options import add_roe_options

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_roe_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--api-key", help="require this bearer token (or set ROE_API_KEY)")
    p.add_argument("--max-k", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-queue", type=int, default=64)
    p.set_defaults(func=cmd_serve)


__all__ = ["Limits", "create_app", "chat_prompt"]
