"""`roe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with RoE settings per request.

One worker thread runs the model. Requests queue in arrival order; when the
worker takes the oldest one it also takes every queued request with the same
RoE settings and sampling parameters (up to `max_batch`) and decodes them as
one batch, each with its own seed. A full queue answers 429 (with Retry-After);
a request that can never fit (more completions than the queue holds) answers 400.

RoE settings travel in an extra `roe` object, which the `openai` client sends with
`extra_body={"roe": {...}}`. Chat prompts use the tokenizer's chat template, or
this plain one when it has none: "System: ...\\nUser: ...\\nAssistant:" (one line
per message, ending with "Assistant:").

Prompts on /v1/completions: a string, a list of strings, a list of token ids or a
list of lists of token ids. `logprobs` (top-n, n <= 20) and `echo` report log-probs
of the aggregated RoE distribution (before temperature and top_p), the same
distribution, with the same seed, that picked the tokens: after a batch is decoded,
the worker re-runs its (prompt, completion) pairs teacher-forced with each job's
seed (the generation loop's semantics, see `roe.score`). With `echo`, the first
prompt token has no log-prob (null); `max_tokens: 0` with `echo` scores the prompt
only. A completion that ended on EOS lists the EOS token last (as vLLM does), so
`echo` + `max_tokens: 1` always has len(prompt) + 1 entries. Streams do not carry
log-probs (400).

Abuse bounds. The request body is read up to a limit derived from
--max-prompt-tokens (413 beyond it, before anything is parsed), a prompt's
characters are bounded before it is tokenized (a prompt of at most N tokens has at
most N x the longest vocabulary entry's characters), and tokenization and chat
templating run on a separate thread, so the event loop (and /health) never waits
for them. A job whose client disconnected, or whose stream was closed, is dropped
from the queue; a running batch whose clients all left stops at its next decode
step. On shutdown (SIGTERM), queued jobs answer 503 at once, the running batch
finishes, and uvicorn waits at most --timeout-graceful-shutdown seconds.
"""

import asyncio
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import RoEConfig
from .engine import aggregate, pad_batch
from .generate import Completion, SamplingParams, decode_steps, new_text
from .routing import SEED_RANGE, layer_taus

log = logging.getLogger("roe.server")

MAX_TAU = 10.0  # the paper never goes above 0.5 and quality collapses above about 1
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy decoding (dividing by ~0 overflows to inf/nan)
MIN_TOP_P = 1e-6  # below it only the most likely token survives (exactly greedy for vocabularies up to 1e6)
MAX_LOGPROBS = 20
MAX_STOPS = 16  # OpenAI allows 4; lm-eval adds the EOS string to a task's own stop list
SCORE_ROWS = 8  # items per teacher-forced scoring forward
SCORE_BUDGET = 256 << 20  # bytes of logits (and aggregate's float32 copies) one scoring forward may hold
BODY_SLACK = 64 << 10  # request-body bytes allowed on top of the prompts (the other fields)


@dataclass(frozen=True)
class Limits:
    max_k: int = 64
    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_queue: int = 64
    max_batch: int = 16
    max_n: int = 8
    max_prompts: int = 64  # prompts in one /v1/completions request


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


# ---- request bodies ---------------------------------------------------------------------------------
# strict: JSON true is not 1, 1.0 is not an integer, "3" is not a number

_STRICT = ConfigDict(extra="forbid", strict=True)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RoESettings(BaseModel):
    model_config = _STRICT
    num_samples: int | None = Field(None, ge=1)
    tau: Any = None
    skip_layers: int | None = Field(None, ge=0)
    aggregate: Literal["probs", "logits", "logprobs"] | None = None
    cache: Literal["clean", "full"] | None = None

    @field_validator("tau")
    @classmethod
    def _tau(cls, v):
        if v is None:
            return v
        values = v if isinstance(v, list) else [v]
        if not values or not all(_is_number(t) for t in values):
            raise ValueError("tau must be a number or a non-empty list of numbers (one per MoE layer)")
        for t in values:
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"tau must be >= 0 (0 is the model's own routing), got {t}")
            if t > MAX_TAU:
                raise ValueError(f"tau must be <= {MAX_TAU:g}, got {t} (the paper's values are <= 0.5; "
                                 "quality collapses above about 1)")
        return [float(t) for t in v] if isinstance(v, list) else float(v)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class _Common(BaseModel):
    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    roe: RoESettings | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(v)}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        lo, hi = SEED_RANGE
        if v is not None and not lo <= v < hi:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {v}")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported")
        return self


class CompletionRequest(_Common):
    prompt: Any
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v) -> list:
        """-> a list of prompts, each a string or a list of token ids."""
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is an empty list")
            if all(isinstance(p, str) for p in v):
                return v
            if all(_is_int(t) for t in v):
                return [v]
            if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in v):
                return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers) "
                         "or a list of lists of token ids")


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first error as one line: 'field.path: what is wrong' (our own messages without pydantic's prefix)."""
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    if err["type"] == "extra_forbidden":
        return f"unsupported parameter: {where}", where or None
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        msg = str(err["ctx"]["error"])
    else:
        msg = err.get("msg", "invalid request")
    return (f"{where}: {msg}" if where else msg), where or None


# ---- the model worker ---------------------------------------------------------------------------------


@dataclass
class Job:
    ids: list[int]
    params: SamplingParams | None  # None: no generation (echo with max_tokens 0)
    config: RoEConfig
    seed: int
    loop: asyncio.AbstractEventLoop
    top_n: int | None = None  # alternatives per token to report; None: no log-probs
    echo: bool = False  # log-probs of the prompt tokens too
    cancelled: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is waiting
            pass


class Scheduler:
    """The single model worker: FIFO, batching queued jobs that share settings."""

    def __init__(self, roster, limits: Limits):
        self.roster = roster
        self.limits = limits
        self.jobs: deque[Job] = deque()
        self.running: list[Job] = []
        self.closing = False
        self.rosters: dict[RoEConfig, object] = {}
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._work, daemon=True, name="roe-worker")
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self.lock:
            if self.closing:
                raise APIError(503, "the server is shutting down", "server_error")
            if len(self.jobs) + len(jobs) > self.limits.max_queue:
                raise APIError(429, f"the server is busy: {len(self.jobs)} requests queued (limit "
                                    f"{self.limits.max_queue}); retry shortly", "rate_limit_error",
                               headers={"Retry-After": "1"})
            self.jobs.extend(jobs)
            self.lock.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client left: drop these jobs from the queue; a running batch stops once all its jobs are cancelled."""
        with self.lock:
            for job in jobs:
                job.cancelled = True
                try:
                    self.jobs.remove(job)
                except ValueError:
                    pass

    def close(self) -> None:
        """Shutdown: refuse new jobs and answer every queued one 503 now; the running batch finishes (or stops at
        its next step once its clients are gone), then the worker thread ends."""
        with self.lock:
            self.closing = True
            queued = list(self.jobs)
            self.jobs.clear()
            self.lock.notify_all()
        for job in queued:
            job.put(("error", APIError(503, "the server is shutting down; this request was not started", "server_error")))

    def _take_batch(self) -> list[Job] | None:
        with self.lock:
            while not self.jobs:
                if self.closing:
                    return None
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
            self.running = batch
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:  # closed and idle
                return
            try:
                self._run(batch)
            except Exception:  # a failing batch must not take the server down; the message stays in the log
                log.exception("generation failed")
                for job in batch:
                    job.put(("error", APIError(500, "generation failed (the server log has the details)",
                                               "server_error")))
            finally:
                with self.lock:
                    self.running = []

    def _run(self, batch: list[Job]) -> None:
        roster = self._roster_for(batch[0].config)
        params = batch[0].params
        if params is None:  # echo with max_tokens 0: nothing to generate, only the prompt to score
            outs = [Completion(prompt_tokens=len(j.ids), finish_reason="length") for j in batch]
        else:
            sent = [0] * len(batch)
            outs: list[Completion] = []
            # log-probs of generated tokens are kept as they are decoded; an echo's prompt is scored afterwards
            wanted = [j.top_n for j in batch if j.top_n is not None and not j.echo]
            steps = decode_steps(roster, [j.ids for j in batch], params, [j.seed for j in batch],
                                 top_logprobs=max(wanted) if wanted else None)
            try:
                for outs in steps:
                    if all(j.cancelled for j in batch):
                        log.info("stopped a batch of %d: every client left", len(batch))
                        return
                    for i, (job, out) in enumerate(zip(batch, outs)):
                        piece = new_text(out, sent[i], params.stop)
                        if piece:
                            sent[i] += len(piece)
                            job.put(("delta", piece))
            finally:
                steps.close()
        tables = self._logprobs(roster, batch, outs)
        for job, out, table in zip(batch, outs, tables):
            job.put(("done", (out, table)))

    def _logprobs(self, roster, batch: list[Job], outs: list[Completion]) -> list:
        """Per job that asked: [(token id, log-prob, [(alternative id, log-prob), ...]), ...] for the scored tokens:
        those kept while decoding, or, with echo (the prompt's too), scored afterwards."""
        items, seeds, where = [], [], []
        tables: list = [None] * len(batch)
        for i, (job, out) in enumerate(zip(batch, outs)):
            if job.top_n is None or job.cancelled:
                continue
            if not job.echo and out.logprobs is not None:  # kept while decoding
                tables[i] = [(tok, lp, alts[: job.top_n]) for tok, lp, alts in out.logprobs]
                continue
            end = None
            if job.params is not None and out.finish_reason == "stop" and roster.eos_token_ids:
                full = roster.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                if not any(s in full for s in job.params.stop):  # it ended on EOS, not on a stop string
                    end = sorted(roster.eos_token_ids)
            items.append((job.ids + out.token_ids, 1 if job.echo else len(job.ids), end))
            seeds.append(job.seed)
            where.append(i)
        if items:
            top_n = max(batch[i].top_n for i in where)
            for i, table in zip(where, score_positions(roster, items, seeds, top_n)):
                n = batch[i].top_n
                tables[i] = [(tok, lp, alts[:n]) for tok, lp, alts in table]
        return tables

    def _roster_for(self, config: RoEConfig):
        """The roster for these settings (seeds travel per job), made once per distinct setting."""
        key = config.replace(seed=0)
        if key not in self.rosters:
            made = self.roster.with_config(**key.to_dict())
            made.eos_token_ids = self.roster.eos_token_ids  # the served roster's, not re-read from the checkpoint
            self.rosters[key] = made
        return self.rosters[key]


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def score_positions(roster, items: list[tuple[list[int], int, list[int] | None]], seeds: list[int],
                    top_n: int) -> list[list[tuple[int, float, list[tuple[int, float]]]]]:
    """Teacher-forced log-probs under RoE, with the generation loop's semantics (as `roe.score`).

    items: (ids, start, end): score ids[p] given ids[:p] for every p >= start, with that item's seed; `end` (a
    list of token ids or None) adds one more position after the last id, scoring the most likely of `end` there
    (the EOS that ended a completion). -> per item, per scored position: (token id, its log-prob, the top_n
    most likely (id, log-prob) pairs, best first).
    """
    out: list[list] = [[] for _ in items]
    todo = [i for i, (ids, start, end) in enumerate(items) if len(ids) > start or end]
    if not todo:
        return out
    k = roster.config.num_samples
    per_position = k * _vocab_size(roster.model) * 16  # float32 logits + aggregate's float32 copies
    fit = max(1, SCORE_BUDGET // per_position)
    group_size = min(SCORE_ROWS, fit)
    pad = roster.pad_token_id
    for g in range(0, len(todo), group_size):
        group = todo[g : g + group_size]
        hist, inputs, targets, ends = [], [], [], []
        for i in group:
            ids, start, end = items[i]
            hist.append(ids[: start - 1])
            inputs.append(ids[start - 1 :] if end else ids[start - 1 : -1])
            targets.append(ids[start:])
            ends.append(end)
        steps = max(len(x) for x in inputs)
        prefix, prefix_mask = pad_batch(hist, max(len(h) for h in hist), pad, left=True)
        chunk, chunk_mask = pad_batch(inputs, steps, pad, left=False)
        run = roster.new_pass([seeds[i] for i in group], capacity=prefix.shape[1] + steps, compile=None)  # eager chunks
        run.prefill(prefix, prefix_mask)
        width = max(1, min(64, fit // len(group)))
        for s0 in range(0, steps, width):
            logits = run.forward(chunk[:, s0 : s0 + width], chunk_mask[:, s0 : s0 + width])  # [B, K, s, V]
            logp = aggregate(logits, roster.config.aggregate)  # [B, s, V] float32
            del logits
            top = logp.topk(top_n, dim=-1) if top_n else None
            top_ids = top.indices.cpu().tolist() if top_n else None
            top_lps = top.values.cpu().tolist() if top_n else None
            for b, i in enumerate(group):
                for j in range(min(logp.shape[1], len(inputs[b]) - s0)):
                    q = s0 + j
                    if q < len(targets[b]):
                        tok = targets[b][q]
                    else:  # the position after the completion: the EOS that ended it
                        cand = ends[b]
                        tok = cand[int(logp[b, j, cand].argmax())]
                    alts = list(zip(top_ids[b][j], top_lps[b][j])) if top_n else []
                    out[i].append((tok, float(logp[b, j, tok]), alts))
            del logp
    return out


# ---- the app -----------------------------------------------------------------------------------------


def _longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry: a prompt of N tokens has at most N times as many characters
    (byte-level BPE entries spell every byte as one character, SentencePiece entries every character as one)."""
    try:
        return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    except Exception:  # a tokenizer without a vocabulary listing: a generous bound
        return 256


class _Gate:
    """Pure ASGI middleware: the API key (constant-time compare), the access log, and a JSON 500 for any
    unhandled error (a handler bug never shows a traceback to the client)."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [None]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.expected is not None and scope["path"] != "/health":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                await _send_json(send_, 401, _error_body("missing or wrong API key (send 'Authorization: Bearer "
                                                         "<key>')", "authentication_error"))
                log.info("%s %s %d - %.0fms", scope["method"], scope["path"], 401, 1000 * (time.perf_counter() - start))
                return
        try:
            await self.app(scope, receive, send_)
        except Exception:
            log.exception("unhandled error")
            if status[0] is None:
                await _send_json(send_, 500, _error_body("internal server error", "server_error"))
        tokens = scope.get("state", {}).get("tokens", "-")
        log.info("%s %s %s tokens=%s %.0fms", scope["method"], scope["path"], status[0], tokens,
                 1000 * (time.perf_counter() - start))


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def create_app(roster, model_name: str = "roe", limits: Limits | None = None, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    limits = limits or Limits()
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="roster-of-experts", version="0.1.0", **docs)
    scheduler = Scheduler(roster, limits)
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roe-tokenize")
    started = int(time.time())
    vocab = _vocab_size(roster.model)
    max_prompt_chars = limits.max_prompt_tokens * _longest_token(roster.tokenizer)
    # room for a full list of token-id prompts (<= 8 bytes an id), plus one prompt of the longest possible text
    # with every character escaped (6 bytes each), plus the other fields
    max_body = BODY_SLACK + limits.max_prompts * limits.max_prompt_tokens * 8 + 6 * max_prompt_chars
    app.state.scheduler = scheduler
    app.state.max_body_bytes = max_body
    app.state.max_prompt_chars = max_prompt_chars
    app.add_middleware(_Gate, api_key=api_key)
    token_texts: dict[int, str] = {}

    def error(status, message, kind="invalid_request_error", param=None, headers=None):
        return JSONResponse(_error_body(message, kind, param), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return error(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    async def parse(request: Request, model: type[BaseModel]):
        """Read the body (bounded), parse JSON and validate it; every failure is an OpenAI-format 4xx."""
        too_large = APIError(413, f"the request body is larger than this server's limit of {max_body} bytes "
                                  "(derived from --max-prompt-tokens)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            raise too_large if length.isdigit() else APIError(400, "invalid Content-Length header")
        parts, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise too_large
                parts.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client closed the connection before sending the whole body") from None
        try:
            body = json.loads(b"".join(parts).decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, NaN/Infinity, nested too deep
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": len(scheduler.jobs), "running": len(scheduler.running)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "roe"}]}

    def settings(req: _Common, echo: bool, jobs_per_prompt: int) -> tuple[RoEConfig, SamplingParams | None, int, int]:
        if req.model != model_name:
            raise APIError(400, f"unknown model {req.model!r}; this server serves {model_name!r}", param="model")
        changes = req.roe.model_dump(exclude_none=True) if req.roe else {}
        try:
            config = roster.config.replace(**changes)
            if config.num_samples > limits.max_k:
                raise ValueError(f"roe.num_samples is {config.num_samples}; this server allows at most {limits.max_k}")
            layer_taus(config.tau, config.skip_layers, len(roster.routers))  # a tau list must fit the model
            given = [m for m in (req.max_completion_tokens, req.max_tokens) if m is not None]
            max_tokens = given[0] if given else min(16, limits.max_tokens)
            if max_tokens > limits.max_tokens:
                raise ValueError(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}")
            if max_tokens == 0 and not echo:
                raise ValueError("max_tokens must be >= 1 (0 only with echo, to score the prompt)")
            n = req.n or 1
            if n > limits.max_n:
                raise ValueError(f"n is {n}; this server allows at most {limits.max_n}")
            temperature = 1.0 if req.temperature is None else req.temperature
            top_p = 1.0 if req.top_p is None else req.top_p
            sampled = temperature >= MIN_TEMPERATURE and top_p >= MIN_TOP_P  # tiny ones: greedy decoding
            params = None if max_tokens == 0 else SamplingParams(
                max_tokens, sampled, temperature if sampled else 1.0, top_p if sampled else 1.0, req.stop)
            seed = req.seed if req.seed is not None else roster.config.seed
            if seed + jobs_per_prompt - 1 >= SEED_RANGE[1]:
                raise ValueError(f"seed + n - 1 must be < 2**63 (completion i uses seed + i), got seed {seed} "
                                 f"and n {jobs_per_prompt}")
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return config, params, seed, max_tokens

    def check_ids(where: str, ids: list[int], reserve: int) -> list[int]:
        if not ids:
            raise APIError(400, f"{where}the prompt is an empty list of token ids", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{where}token id {bad} is out of range (the vocabulary has {vocab} tokens)",
                           param="prompt")
        check_length(len(ids), reserve)
        return ids

    def check_length(n: int, reserve: int) -> None:
        if n > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n} tokens; this server allows at most {limits.max_prompt_tokens}",
                           param="prompt")
        if roster.max_context is not None and n + reserve > roster.max_context:
            raise APIError(400, f"the prompt has {n} tokens plus {reserve} new tokens, more than the model's "
                                f"context of {roster.max_context} tokens", param="prompt")

    def check_chars(n: int) -> None:
        if n > max_prompt_chars:
            raise APIError(400, f"the prompt has {n} characters; a prompt of at most {limits.max_prompt_tokens} "
                                f"tokens has at most {max_prompt_chars} with this tokenizer", param="prompt")

    def encode_text(text: str, reserve: int) -> list[int]:  # on the tokenizer thread
        try:
            ids = roster.encode_prompt(text, 0)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="prompt") from None
        check_length(len(ids), reserve)
        return ids

    def encode_all(prompts: list, reserve: int) -> list[list[int]]:  # on the tokenizer thread
        return [encode_text(p, reserve) if isinstance(p, str) else p for p in prompts]

    def encode_chat(messages: list[ChatMessage], reserve: int) -> tuple[str, list[int]]:  # on the tokenizer thread
        try:
            text = chat_prompt(roster.tokenizer, messages)
        except Exception as e:  # the chat template refused these messages (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template cannot format these messages: {e}", param="messages") from None
        return text, encode_text(text, reserve)

    def text_of(token: int) -> str:
        if token not in token_texts:
            token_texts[token] = roster.tokenizer.decode([token])
        return token_texts[token]

    def completion_logprobs(entries) -> dict:  # on the tokenizer thread; offsets index the choice's text
        tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
        for tok, lp, alts in entries:
            text = text_of(tok)
            tokens.append(text)
            token_lps.append(lp)
            offsets.append(offset)
            offset += len(text)
            if lp is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for a, alp in alts:
                top.setdefault(text_of(a), alp)
            top.setdefault(text, lp)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(entries) -> dict:  # on the tokenizer thread
        def one(tok, lp):
            text = text_of(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(tok, lp), "top_logprobs": [one(a, alp) for a, alp in alts]}
                            for tok, lp, alts in entries],
                "refusal": None}

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    async def wait_done(jobs: list[Job], request: Request):
        """Every job's (Completion, log-prob table); None when the client left first (its jobs are cancelled)."""

        async def collect():
            outs = []
            for job in jobs:
                while True:
                    tag, item = await job.queue.get()
                    if tag == "error":
                        raise item
                    if tag == "done":
                        outs.append(item)
                        break
            return outs

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            return collecting.result() if collecting.done() else None
        except asyncio.CancelledError:
            if not scheduler.closing:
                raise
            # uvicorn's graceful-shutdown timeout cancelled this request: answer it rather than leave uvicorn's
            # plain-text 500 (the loop still sends this before it stops)
            raise APIError(503, "the server shut down before this request finished", "server_error") from None
        finally:
            collecting.cancel()
            watching.cancel()
            scheduler.cancel(jobs)  # no-op for finished jobs

    async def run(prompts: list, req: _Common, chat: bool, request: Request):
        """prompts: strings or token-id lists (completions), or one list of chat messages (chat)."""
        echo = bool(getattr(req, "echo", False)) and not chat
        n = req.n or 1
        if len(prompts) * n > limits.max_queue:
            raise APIError(400, f"this request asks for {len(prompts) * n} completions ({len(prompts)} prompts x "
                                f"n={n}); this server queues at most {limits.max_queue}: send fewer prompts or a "
                                "smaller n", param="n")
        config, params, seed, max_tokens = settings(req, echo, n)
        if chat:
            top_n = (req.top_logprobs or 0) if req.logprobs else None
        else:
            top_n = req.logprobs
        if req.stream and top_n is not None:
            raise APIError(400, "logprobs are not supported with stream: true", param="logprobs")
        if chat:
            check_chars(sum(len(m.content) for m in prompts[0]))
            text, ids = await off_loop(encode_chat, prompts[0], max_tokens)
            texts, encoded = [text], [ids]
        else:
            for i, p in enumerate(prompts):
                if isinstance(p, str):
                    check_chars(len(p))
                else:
                    check_ids(f"prompt {i}: " if len(prompts) > 1 else "", p, max_tokens)
            encoded = await off_loop(encode_all, prompts, max_tokens)
            texts = prompts
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, params, config, seed + i, loop, top_n, echo) for ids in encoded for i in range(n)]
        scheduler.submit(jobs)
        prefixes = [""] * len(jobs)
        if echo:
            shown = [t if isinstance(t, str) else await off_loop(roster.tokenizer.decode, t) for t in texts]
            prefixes = [shown[j // n] for j in range(len(jobs))]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(stream_events(jobs, prefixes, rid, created, chat, req),
                                     media_type="text/event-stream")
        results = await wait_done(jobs, request)
        if results is None:
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        choices = []
        for i, (job, (out, table)) in enumerate(zip(jobs, results)):
            lp = None
            if table is not None:
                if chat:  # the generated tokens (not the EOS that ended them)
                    lp = await off_loop(chat_logprobs, table[: len(out.token_ids)])
                else:
                    lp = await off_loop(completion_logprobs, ([(job.ids[0], None, None)] if echo else []) + table)
            if chat:
                body = {"message": {"role": "assistant", "content": out.text}, "logprobs": lp}
            else:
                body = {"text": prefixes[i] + out.text, "logprobs": lp}
            choices.append({"index": i, **body, "finish_reason": out.finish_reason})
        usage = _usage(jobs, [o for o, _ in results])
        request.state.tokens = usage["completion_tokens"]
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices, "usage": usage}

    async def stream_events(jobs, prefixes, rid, created, chat, req):
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
        try:
            for index, job in enumerate(jobs):
                if chat:
                    yield event(index, role=True)
                elif prefixes[index]:
                    yield event(index, prefixes[index])
                while True:
                    tag, item = await job.queue.get()
                    if tag == "delta":
                        yield event(index, item)
                    elif tag == "done":
                        outs.append(item[0])
                        yield event(index, finish=item[0].finish_reason)
                        break
                    else:
                        yield "data: " + json.dumps(_error_body(item.message, item.kind)) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
            if req.stream_options and req.stream_options.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                                             "choices": [], "usage": _usage(jobs, outs)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the stream ended early (the client closed it) or normally: its jobs need no more work
            scheduler.cancel(jobs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        if len(req.prompt) > limits.max_prompts:
            raise APIError(400, f"the request has {len(req.prompt)} prompts; this server allows at most "
                                f"{limits.max_prompts} per request", param="prompt")
        return await run(req.prompt, req, False, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        return await run([req.messages], req, True, request)

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


def make_server(app, host: str, port: int, graceful_timeout: float):
    """A uvicorn server whose shutdown (SIGTERM, SIGINT) first answers every queued job 503, then lets running
    requests finish for at most `graceful_timeout` seconds (those still running then answer 503)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.scheduler.close()
            await super().shutdown(sockets=sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 timeout_graceful_shutdown=graceful_timeout))


def serve(app, host: str, port: int, graceful_timeout: float) -> None:
    make_server(app, host, port, graceful_timeout).run()


def cmd_serve(args) -> int:
    from .options import load_roster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.timeout_graceful_shutdown < 0:
        raise ValueError(f"--timeout-graceful-shutdown must be >= 0, got {args.timeout_graceful_shutdown}")
    roster = load_roster(args)
    limits = serve_limits(args, roster.max_context)
    api_key = args.api_key or os.environ.get("ROE_API_KEY")
    app = create_app(roster, args.served_model_name or args.model, limits, api_key)
    log.info("serving %s on http://%s:%d (RoE %s)", args.model, args.host, args.port, roster.config)
    serve(app, args.host, args.port, args.timeout_graceful_shutdown)
    return 0


def add_parser(sub) -> None:
    from .parsers import add_serve

    add_serve(sub)


__all__ = ["Limits", "create_app", "chat_prompt", "score_positions"]
