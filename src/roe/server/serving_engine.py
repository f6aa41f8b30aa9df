"""What both endpoints do with a validated request: resolve its settings against the server's limits, check and
tokenize its prompts (on a separate thread, so the event loop and /health never wait for a tokenizer), submit its
jobs to the scheduler, and wait for them or stream them as server-sent events."""

import asyncio
import json
import secrets
import time
import uuid

from ..config import RoEConfig
from ..generate import Completion, SamplingParams
from ..options import adaptive_changes
from ..routing import SEED_RANGE, layer_taus
from .cli_args import Limits
from .protocol import MIN_TEMPERATURE, MIN_TOP_P, APIError, CommonRequest, error_body, model_not_found
from .scheduler import Job, Scheduler
from .scoring import vocab_size


def longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry: a prompt of N tokens has at most N times as many characters
    (byte-level BPE entries spell every byte as one character, SentencePiece entries every character as one)."""
    try:
        return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    except Exception:  # a tokenizer without a vocabulary listing: a generous bound
        return 256


def seed_header(jobs: list[Job]) -> dict:
    return {"x-roe-seed": str(jobs[0].seed)}  # completion i of a prompt used this seed + i


def usage(jobs: list[Job], outs: list[Completion]) -> dict:
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIServing:
    """The parts of serving a request that /v1/completions and /v1/chat/completions share."""

    kind = ""  # the response's `object`
    chunk_kind = ""  # a stream chunk's `object`
    id_prefix = ""

    def __init__(self, roster, model_name: str, limits: Limits, scheduler: Scheduler, tokenizing):
        self.roster, self.model_name, self.limits, self.scheduler = roster, model_name, limits, scheduler
        self.tokenizing = tokenizing  # the one-thread executor tokenization and detokenization run on
        self.vocab = vocab_size(roster.model)
        self.max_prompt_chars = limits.max_prompt_tokens * longest_token(roster.tokenizer)
        self.token_texts: dict[int, str] = {}

    # ---- settings ---------------------------------------------------------------------------------------
    def settings(self, req: CommonRequest, echo: bool, jobs_per_prompt: int,
                 default_max_tokens: int | None) -> tuple[RoEConfig, int | None, int]:
        """-> (RoE config, max new tokens (None: what fits the context, known once the prompt is encoded), first
        seed); an APIError otherwise."""
        if req.model != self.model_name:
            raise model_not_found(req.model, self.model_name)
        try:
            config = self._roe_config(req)
            given = [m for m in (req.max_completion_tokens, req.max_tokens) if m is not None]
            max_tokens = given[0] if given else default_max_tokens
            if max_tokens is not None and max_tokens > self.limits.max_tokens:
                raise ValueError(f"max_tokens is {max_tokens}; this server allows at most {self.limits.max_tokens}")
            if max_tokens == 0 and not echo:
                raise ValueError("max_tokens must be >= 1 (0 only with echo, to score the prompt)")
            if jobs_per_prompt > self.limits.max_n:
                raise ValueError(f"n is {jobs_per_prompt}; this server allows at most {self.limits.max_n}")
            seed = self._seed(req, max_tokens != 0 and self._sampled(req), jobs_per_prompt)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return config, max_tokens, seed

    def _seed(self, req: CommonRequest, sampled: bool, n: int) -> int:
        """The request's seed; without one, a fresh one for a sampled request (as OpenAI's API: each request draws
        anew) and the served default for a greedy one (the same routing noise, so the same text, every time)."""
        if req.seed is None:
            return secrets.randbelow(SEED_RANGE[1] - n + 1) if sampled else self.roster.config.seed
        if req.seed + n - 1 >= SEED_RANGE[1]:
            raise ValueError(f"seed + n - 1 must be < 2**63 (completion i uses seed + i), got seed {req.seed} "
                             f"and n {n}")
        return req.seed

    def _roe_config(self, req: CommonRequest) -> RoEConfig:
        changes = req.roe.model_dump(exclude_none=True) if req.roe else {}
        changes.update(adaptive_changes(changes.pop("adaptive_metric", None), changes.pop("adaptive_threshold", None)))
        config = self.roster.config.replace(**changes)
        if config.num_samples > self.limits.max_k:
            raise ValueError(f"roe.num_samples is {config.num_samples}; this server allows at most {self.limits.max_k}")
        layer_taus(config.tau, config.skip_layers, len(self.roster.routers))  # a tau list must fit the model
        return config

    @staticmethod
    def _sampled(req: CommonRequest) -> bool:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        return temperature >= MIN_TEMPERATURE and top_p >= MIN_TOP_P  # tiny ones: greedy decoding

    def sampling(self, req: CommonRequest, max_tokens: int) -> SamplingParams | None:
        """The decoding loop's parameters; None for max_tokens 0 (score the prompt only)."""
        if max_tokens == 0:
            return None
        sampled = self._sampled(req)
        try:
            return SamplingParams(max_tokens, sampled, req.temperature if sampled and req.temperature else 1.0,
                                  req.top_p if sampled and req.top_p else 1.0, req.stop)
        except ValueError as e:  # an empty stop string
            raise APIError(400, str(e), param="stop") from None

    # ---- prompts ----------------------------------------------------------------------------------------
    def check_ids(self, where: str, ids: list[int], reserve: int) -> list[int]:
        if not ids:
            raise APIError(400, f"{where}the prompt is an empty list of token ids", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise APIError(400, f"{where}token id {bad} is out of range (the vocabulary has {self.vocab} tokens)",
                           param="prompt")
        self.check_length(len(ids), reserve)
        return ids

    def check_length(self, n: int, reserve: int) -> None:
        limit, context = self.limits.max_prompt_tokens, self.roster.max_context
        if n > limit:
            raise APIError(400, f"the prompt has {n} tokens; this server allows at most {limit}", param="prompt")
        if context is not None and n + reserve > context:
            raise APIError(400, f"the prompt has {n} tokens plus {reserve} new tokens, more than the model's "
                                f"context of {context} tokens", param="prompt")

    def check_chars(self, n: int) -> None:
        if n > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {n} characters; a prompt of at most {self.limits.max_prompt_tokens} "
                                f"tokens has at most {self.max_prompt_chars} with this tokenizer", param="prompt")

    def encode_text(self, text: str, reserve: int) -> list[int]:  # on the tokenizer thread
        try:
            ids = self.roster.encode_prompt(text, 0)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="prompt") from None
        self.check_length(len(ids), reserve)
        return ids

    def text_of(self, token: int) -> str:
        if token not in self.token_texts:
            self.token_texts[token] = self.roster.tokenizer.decode([token])
        return self.token_texts[token]

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    # ---- jobs -------------------------------------------------------------------------------------------
    def submit(self, encoded: list[list[int]], config: RoEConfig, params: SamplingParams | None, seed: int, n: int,
               top_n: int | None, echo: bool) -> list[Job]:
        """One job per (prompt, i < n), completion i of a prompt with seed + i; queued on the scheduler."""
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, params, config, seed + i, loop, top_n, echo) for ids in encoded for i in range(n)]
        self.scheduler.submit(jobs)
        return jobs

    @staticmethod
    def check_stream(req: CommonRequest, top_n: int | None) -> None:
        if req.stream and top_n is not None:
            raise APIError(400, "logprobs are not supported with stream: true", param="logprobs")

    def check_count(self, prompts: int, n: int) -> None:
        if prompts * n > self.limits.max_queue:
            raise APIError(400, f"this request asks for {prompts * n} completions ({prompts} prompts x n={n}); this "
                                f"server queues at most {self.limits.max_queue}: send fewer prompts or a smaller n",
                           param="n")

    async def wait_done(self, jobs: list[Job], request) -> list | None:
        """Every job's (Completion, log-prob table); None when the client left first (its jobs are cancelled)."""
        collecting = asyncio.ensure_future(_collect(jobs))
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            return collecting.result() if collecting.done() else None
        except asyncio.CancelledError:
            if not self.scheduler.closing:
                raise
            # uvicorn's graceful-shutdown timeout cancelled this request: answer it rather than leave uvicorn's
            # plain-text 500 (the loop still sends this before it stops)
            raise APIError(503, "the server shut down before this request finished", "server_error") from None
        finally:
            collecting.cancel()
            watching.cancel()
            self.scheduler.cancel(jobs)  # no-op for finished jobs

    # ---- responses --------------------------------------------------------------------------------------
    def new_id(self) -> tuple[str, int]:
        return self.id_prefix + uuid.uuid4().hex[:24], int(time.time())

    def response(self, rid: str, created: int, choices: list, jobs: list[Job], outs: list[Completion], request):
        """The whole answer, with the seed the request used (in its `seed` field and the x-roe-seed header): sent
        back as `seed`, it repeats the request exactly."""
        from fastapi.responses import JSONResponse

        body = {"id": rid, "object": self.kind, "created": created, "model": self.model_name, "choices": choices,
                "usage": usage(jobs, outs), "seed": jobs[0].seed}
        request.state.tokens = body["usage"]["completion_tokens"]
        return JSONResponse(body, headers=seed_header(jobs))

    def streaming(self, jobs: list[Job], rid: str, created: int, req: CommonRequest, opening):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self.stream_events(jobs, rid, created, req, opening), media_type="text/event-stream",
                                 headers=seed_header(jobs))

    def chunk(self, rid: str, created: int, choices: list, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": self.chunk_kind, "created": created,
                                      "model": self.model_name, "choices": choices, **extra}) + "\n\n"

    def choice_chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        raise NotImplementedError

    async def stream_events(self, jobs: list[Job], rid: str, created: int, req: CommonRequest, opening):
        """SSE: each job's pieces then its finish reason, job after job; an error event and [DONE] on failure.
        opening(index) -> the choices sent before a job's first piece (chat: the role; echo: the prompt)."""
        outs = []
        try:
            for index, job in enumerate(jobs):
                for choice in opening(index):
                    yield self.chunk(rid, created, [choice])
                while True:
                    tag, item = await job.queue.get()
                    if tag == "delta":
                        yield self.chunk(rid, created, [self.choice_chunk(index, item)])
                    elif tag == "done":
                        outs.append(item[0])
                        yield self.chunk(rid, created, [self.choice_chunk(index, finish=item[0].finish_reason)])
                        break
                    else:
                        yield "data: " + json.dumps(error_body(item.message, item.kind)) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
            if req.stream_options and req.stream_options.include_usage:
                yield self.chunk(rid, created, [], usage=usage(jobs, outs))
            yield "data: [DONE]\n\n"
        finally:  # the stream ended early (the client closed it) or normally: its jobs need no more work
            self.scheduler.cancel(jobs)


async def _collect(jobs: list[Job]) -> list:
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


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
