"""Slow, idle and surplus connections (`roe serve`'s connection limits, src/roe/server/connections.py), with raw
loopback sockets whose every wait is bounded; /health is timed from another client meanwhile."""

import asyncio
import socket
import time

import httpx
import pytest
from test_server import _Server

from roe import RoEConfig, RosterOfExperts
from roe.server import Limits, create_app
from roe.server.connections import ConnectionLimits

QUICK = ConnectionLimits(timeout_header=0.6, timeout_body=0.6, timeout_idle=0.6, max_connections=64)
HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def roster(tiny_path):
    r = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=2, tau=0.3))
    r.eos_token_ids = set()
    return r


@pytest.fixture(scope="module")
def server(roster):
    s = _Server(create_app(roster, "tiny", Limits(max_tokens=8, max_prompt_tokens=64)), connections=QUICK)
    yield s
    s.stop()


async def _hold(port: int, first: bytes = b"", piece: bytes = b"", every: float = 0.1, limit: float = 5.0):
    """Connect, send `first`, then `piece` every `every` seconds until the server closes the connection (at most
    `limit` seconds). -> (what the server sent, seconds from connecting to its close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(first)
    got = b""

    async def read():
        nonlocal got
        while chunk := await reader.read(65536):
            got += chunk

    reading = asyncio.ensure_future(read())
    try:
        while not reading.done() and time.perf_counter() - start < limit:
            if piece:
                writer.write(piece)
            await asyncio.wait({reading}, timeout=every)
    except ConnectionError:  # the server closed while we wrote
        pass
    try:
        await asyncio.wait_for(reading, timeout=1)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    elapsed = time.perf_counter() - start
    writer.close()
    assert reading.done(), f"the connection was still open after {limit} s"
    return got, elapsed


async def _with_health(url: str, clients) -> tuple[list, float]:
    """Run the clients while timing /health every 20 ms from a client of its own. -> (their results, worst s)."""
    tasks = asyncio.gather(*clients)
    worst = 0.0
    async with httpx.AsyncClient(timeout=5) as c:
        await asyncio.sleep(0.2)  # the slow clients are connected
        while not tasks.done():
            t = time.perf_counter()
            assert (await c.get(url + "/health")).status_code == 200
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0.02)
    return await tasks, worst


def test_idle_connections_are_closed(server):
    results, worst = asyncio.run(_with_health(server.url, [_hold(server.port) for _ in range(40)]))
    for got, elapsed in results:
        # closed without a word, not before timeout_idle (_hold fails if the server never closes)
        assert got == b"" and elapsed > 0.5, (got, elapsed)
    assert worst < 0.5, f"/health took {worst * 1000:.0f} ms while 40 idle connections were open"


def test_trickled_headers_get_408(server):
    clients = [_hold(server.port, HEADERS, b"x", every=0.05) for _ in range(20)]  # a header byte every 50 ms
    results, worst = asyncio.run(_with_health(server.url, clients))
    for got, elapsed in results:
        assert got.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive within 0.6 s" in got, got
        assert elapsed > 0.5, elapsed  # not before the timeout; _hold fails if the server never closes
    assert worst < 0.5, f"/health took {worst * 1000:.0f} ms while 20 clients trickled headers"


def test_incomplete_or_trickled_body_gets_408(server):
    short = HEADERS + b"Content-Length: 1000\r\nContent-Type: application/json\r\n\r\n" + b" " * 32
    trickled = HEADERS + b"Content-Length: 1000\r\n\r\n"
    results, worst = asyncio.run(_with_health(server.url, [_hold(server.port, short), _hold(server.port, trickled, b" ")]))
    for got, elapsed in results:
        assert got.startswith(b"HTTP/1.1 408 ") and b'"message": "the request\'s body did not arrive within 0.6 s"' in got
        assert elapsed > 0.5, elapsed  # not before the timeout; _hold fails if the server never closes
    assert worst < 0.5
    # the server still answers a whole request after them
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_keep_alive_connection_is_closed_when_idle(server):
    got, elapsed = asyncio.run(_hold(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert got.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in got and 0.5 < elapsed < 2.5, (got, elapsed)


def test_connections_over_the_bound_are_refused_at_once(roster):
    s = _Server(create_app(roster, "tiny", Limits(max_tokens=4)),
                connections=ConnectionLimits(timeout_idle=30, max_connections=5))
    held = []
    try:
        for _ in range(5):
            held.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
        time.sleep(0.2)  # the server has accepted them
        extra = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        t = time.perf_counter()
        got = b""
        while chunk := extra.recv(65536):  # the 503, then the server's end of the connection
            got += chunk
        elapsed = time.perf_counter() - t
        extra.close()
        assert got.startswith(b"HTTP/1.1 503 ") and b"open connections" in got and elapsed < 0.5, (got, elapsed)
        r = httpx.get(s.url + "/health", timeout=5)  # a real client, sending its request: the same answer
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-connections" in r.json()["error"]["message"]
        for sock in held:
            sock.close()
        for _ in range(100):  # bounded: the server notices the closed ones
            if httpx.get(s.url + "/health", timeout=5).status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200
    finally:
        for sock in held:
            sock.close()
        s.stop()
