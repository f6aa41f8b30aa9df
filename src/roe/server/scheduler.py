"""The model worker: one thread that batches queued jobs and decodes them.

Requests queue in arrival order; when the worker takes the oldest job it also takes every queued job with the same
RoE settings and sampling parameters (up to `max_batch`) and decodes them as one batch, each with its own seed. A
full queue answers 429 (with Retry-After). The worker talks to the event loop through each job's asyncio queue:
("delta", text), ("done", (Completion, log-prob table)) or ("error", APIError).

A job whose client disconnected, or whose stream was closed, is dropped from the queue; a running batch whose
clients all left stops at its next decode step. On shutdown, queued jobs answer 503 at once and the running batch
finishes, or is ended at the graceful timeout (`end_running`).
"""

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from ..config import RoEConfig
from ..generate import Completion, SamplingParams, decode_steps, new_text
from .cli_args import Limits
from .protocol import APIError
from .scoring import score_positions

log = logging.getLogger("roe.server")


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

    def end_running(self) -> int:
        """Shutdown, at the graceful timeout: the running batch's requests are answered 503 now (a stream gets an
        error event and [DONE]) and the worker stops at its next step. -> how many requests were ended."""
        with self.lock:
            running = [job for job in self.running if not job.cancelled]
            for job in running:
                job.cancelled = True
        for job in running:
            job.put(("error", APIError(503, "the server shut down before this request finished", "server_error")))
        return len(running)

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
        if batch[0].params is None:  # echo with max_tokens 0: nothing to generate, only the prompt to score
            outs = [Completion(prompt_tokens=len(j.ids), finish_reason="length") for j in batch]
        else:
            outs = self._generate(roster, batch)
            if outs is None:
                return
        tables = self._logprobs(roster, batch, outs)
        for job, out, table in zip(batch, outs, tables):
            job.put(("done", (out, table)))

    def _generate(self, roster, batch: list[Job]) -> list[Completion] | None:
        """Decode the batch, sending each job's final text as it grows; None when every client left."""
        params = batch[0].params
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
                    return None
                for i, (job, out) in enumerate(zip(batch, outs)):
                    piece = new_text(out, sent[i], params.stop)
                    if piece:
                        sent[i] += len(piece)
                        job.put(("delta", piece))
        finally:
            steps.close()
        return outs

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
