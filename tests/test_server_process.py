"""`roe serve` as a separate process on loopback: lm-eval's `local-completions` model scoring through the API
(matching `--model roe` at K = 1), oversized prompts (a responsive /health, flat memory), and SIGTERM."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from lm_eval_tasks import CHOICE, PPL, write_builtin_data, write_task

from roe import builtin_path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """`roe serve --model MODEL ...` on a free loopback port; its log goes to a file (a pipe could fill up)."""

    def __init__(self, tmp, model, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"serve-{self.port}.log", "w+")
        cmd = [sys.executable, "-m", "roe.cli", "serve", "--model", str(model), "--served-model-name", "builtin",
               "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        for _ in range(1200):  # bounded: at most 2 minutes for the process to import and load the model
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        self.log.seek(0)
        raise RuntimeError("roe serve did not start:\n" + self.log.read()[-3000:])

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    p = _Process(tmp_path_factory.mktemp("serve"), "builtin:s", "-k", "1", "--dtype", "float32")
    yield p
    p.stop()


TASKS = {"roe_api_choice": ("choice", CHOICE), "roe_api_ppl": ("ppl", PPL)}  # name: (data file, task body)


def _samples(out, task):
    """doc_id -> the model's answers for that doc (log-likelihoods and greedy flags, or rolling log-likelihoods)."""
    return {s["doc_id"]: s["resps"] for s in out["samples"][task]}


def test_lm_eval_local_completions_matches_roe_at_k1(served, tmp_path, monkeypatch):
    """lm-eval scores through /v1/completions (token-id prompts, echo, logprobs) exactly as `--model roe` does."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity, aiohttp, requests)")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import roe.harness  # noqa: F401  (registers --model roe)

    write_builtin_data(tmp_path, choice=6, ppl=2)
    for task, (data, body) in TASKS.items():
        write_task(tmp_path, task, data, body)
    path = builtin_path("s")
    common = dict(tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path)), batch_size=4,
                  log_samples=True, bootstrap_iters=0)
    api = simple_evaluate(model="local-completions", model_args=(
        f"base_url={served.url}/v1/completions,model=builtin,tokenizer_backend=huggingface,tokenizer={path},"
        "max_length=512,max_retries=1"), **common)
    # both in float32 (each defaults to the checkpoint's own dtype, bfloat16 here)
    local = simple_evaluate(model="roe", model_args=f"pretrained={path},num_samples=1,dtype=float32", **common)
    for task in TASKS:
        a, b = _samples(api, task), _samples(local, task)
        assert a.keys() == b.keys() and len(a) >= 2
        for doc in a:
            assert len(a[doc]) == len(b[doc]) >= 1
            for x, y in zip(a[doc], b[doc]):
                (x,), (y,) = x, y
                if isinstance(x, (list, tuple)):  # loglikelihood: (log-likelihood, is greedy)
                    assert x[0] == pytest.approx(y[0], rel=1e-4, abs=1e-4) and bool(x[1]) == bool(y[1]), (task, doc)
                else:  # loglikelihood_rolling
                    assert x == pytest.approx(y, rel=1e-4, abs=1e-4), (task, doc)
        for metric, value in api["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert value == pytest.approx(local["results"][task][metric], rel=1e-4), metric


def test_oversized_prompts_keep_health_responsive_and_memory_flat(served):
    """32 MiB bodies (with a length, and chunked) and a prompt over the character bound are refused at once while
    /health keeps answering; resident memory stays near its level before (it rose by GiBs when the whole prompt
    was tokenized on the event loop). The 2 s bound on /health is generous for a loaded 2-core machine: the old
    server did not answer for the whole tokenization (7 s for 4 MiB, minutes for 32 MiB)."""
    httpx.post(served.url + "/v1/completions", json={"model": "builtin", "prompt": "hi", "max_tokens": 2}, timeout=60)
    before = served.rss_mib()
    big = json.dumps({"model": "builtin", "prompt": "x " * (16 << 20), "max_tokens": 4}).encode()  # 32 MiB

    async def chunks():  # no Content-Length: chunked transfer encoding
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    async def with_health(send):
        worst = 0.0
        async with httpx.AsyncClient(timeout=120) as c:
            task = asyncio.ensure_future(send(c))
            for _ in range(6000):  # bounded: /health every 20 ms while the big request is in flight
                if task.done():
                    break
                t = time.perf_counter()
                assert (await c.get(served.url + "/health")).status_code == 200
                worst = max(worst, time.perf_counter() - t)
                await asyncio.sleep(0.02)
            return await task, worst

    headers = {"Content-Type": "application/json"}
    url = served.url + "/v1/completions"
    cases = [
        (413, "larger than this server's limit", lambda c: c.post(url, content=big, headers=headers)),
        (413, "larger than this server's limit", lambda c: c.post(url, content=chunks(), headers=headers)),
        (400, "characters", lambda c: c.post(url, json={"model": "builtin", "prompt": "x " * 50_000})),
    ]
    for status, message, send in cases:
        r, worst = asyncio.run(with_health(send))
        assert r.status_code == status and message in r.json()["error"]["message"], r.text[:300]
        assert worst < 2.0, f"/health took {worst:.2f} s during an oversized request"
    del big
    assert served.rss_mib() < before + 64, (before, served.rss_mib())
    ok = httpx.post(url, json={"model": "builtin", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_answers_queued_503_finishes_running_and_exits(tmp_path, tiny_path):
    """The tiny random checkpoint: it never picks EOS within 60 tokens from this prompt, so the running job lasts
    while the eleven others queue (the built-in model answers in a few tokens)."""
    p = _Process(tmp_path, tiny_path("olmoe"), "-k", "8", "--tau", "0.3", "--timeout-graceful-shutdown", "60")
    try:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                def body(i):  # different tau: no batching, one runs and eleven queue
                    return {"model": "builtin", "prompt": "hello", "max_tokens": 60, "temperature": 0,
                            "roe": {"tau": 0.01 * (i + 1)}}

                running = asyncio.ensure_future(c.post(p.url + "/v1/completions", json=body(0)))
                for _ in range(600):
                    if (await c.get(p.url + "/health")).json()["running"]:
                        break
                    await asyncio.sleep(0.02)
                queued = [asyncio.ensure_future(c.post(p.url + "/v1/completions", json=body(i))) for i in range(1, 12)]
                for _ in range(600):
                    if (await c.get(p.url + "/health")).json()["queued"] == 11:
                        break
                    await asyncio.sleep(0.02)
                health = (await c.get(p.url + "/health")).json()
                p.proc.send_signal(signal.SIGTERM)
                return health, await running, await asyncio.gather(*queued)

        health, running, queued = asyncio.run(main())
        assert health["running"] == 1 and health["queued"] == 11, health
        assert running.status_code == 200 and running.json()["usage"]["completion_tokens"] == 60  # finished
        assert [r.status_code for r in queued] == [503] * 11  # answered at once, not drained
        assert all("shutting down" in r.json()["error"]["message"] for r in queued)
        assert p.proc.wait(60) == 0
    finally:
        p.stop()


async def _stream_lines(c, url, body):
    """A stream's `data:` lines, read to the end (httpx raises if the chunked body is cut without its terminator)."""
    async with c.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        return [line async for line in r.aiter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("sig, stream", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_shutdown_ends_running_requests_and_exits_0(tmp_path, tiny_path, sig, stream):
    """A request (n=2) still running at the graceful timeout: a stream ends with an error event and [DONE], a plain
    request answers 503; the process exits 0 within the timeout plus a second, with no traceback and no abort."""
    graceful = 0.2
    p = _Process(tmp_path, tiny_path("olmoe"), "-k", "64", "--tau", "0.3", "--max-tokens", "120",
                 "--timeout-graceful-shutdown", str(graceful))
    url = p.url + "/v1/completions"
    body = {"model": "builtin", "prompt": "hello", "max_tokens": 120, "temperature": 0, "n": 2, "stream": stream}
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                request = asyncio.ensure_future(_stream_lines(c, url, body) if stream else c.post(url, json=body))
                for _ in range(1500):  # bounded: until its batch runs (120 steps at K = 64: seconds)
                    if (await c.get(p.url + "/health")).json()["running"] == 2:
                        break
                    await asyncio.sleep(0.01)
                p.proc.send_signal(sig)
                sent = time.perf_counter()
                return await request, sent

        answer, sent = asyncio.run(main())
        code = p.proc.wait(10)
        exited = time.perf_counter() - sent
        if stream:
            assert answer[-1] == "data: [DONE]", answer[-3:]  # (the error says it was running, not queued)
            error = json.loads(answer[-2][6:])["error"]
            assert error["message"] == "the server shut down before this request finished", error
            assert error["type"] == "server_error"
        else:
            assert answer.status_code == 503 and "shut down before this request finished" in answer.text
        assert code == 0 and exited < graceful + 1.0, (code, exited)
    finally:
        p.stop()
    with open(p.log.name) as f:
        log = f.read()
    for bad in ("Traceback", "terminate called", "CancelledError", "Exception in ASGI"):
        assert bad not in log, log[-3000:]
