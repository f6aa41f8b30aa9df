"""Requests/s and tokens/s of `roe serve` under concurrency 1, 8 and 32 (writes benchmarks/RESULTS-serve.md).

    .venv/bin/python benchmarks/serve_bench.py [--requests 64] [--max-tokens 32]

Starts the server in-process on a free loopback port with the built-in model and its RoE profile, then sends
streaming completion requests with httpx, `concurrency` at a time. Each request has its own prompt and seed;
identical settings let the server batch requests that wait together.
"""

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from roe import RosterOfExperts, tasks
from roe.server import Limits, create_app

HERE = Path(__file__).parent


async def one(client, url, prompt, seed, max_tokens):
    body = {"model": "builtin", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    return time.perf_counter() - start, first or float("nan"), tokens


async def level(url, prompts, concurrency, max_tokens):
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def run(i, p):
            async with sem:
                return await one(client, url, p, i, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*[run(i, p) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - start
    lat = [r[0] for r in results]
    return {"concurrency": concurrency, "requests": len(prompts), "seconds": wall,
            "requests_per_s": len(prompts) / wall, "tokens_per_s": sum(r[2] for r in results) / wall,
            "latency_p50_s": statistics.median(lat), "latency_max_s": max(lat),
            "first_token_p50_s": statistics.median(r[1] for r in results)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    roster = RosterOfExperts.from_pretrained("builtin")
    app = create_app(roster, "builtin", Limits(max_queue=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    prompts = [tasks.math.prompt(e["question"]) for e in tasks.examples("math", "test", args.requests)]
    asyncio.run(level(url, prompts[:4], 4, 4))  # warm-up
    rows = [asyncio.run(level(url, prompts, c, args.max_tokens)) for c in (1, 8, 32)]
    server.should_exit = True
    c = roster.config
    md = ["# Serving throughput\n",
          f"`roe serve` with builtin:s and its profile (K = {c.num_samples}, tau = {list(c.tau)}, clean cache), "
          f"{args.requests} streaming completions of {args.max_tokens} tokens each (greedy, test-split math prompts), "
          f"CPU ({torch.get_num_threads()} threads). Command: `.venv/bin/python benchmarks/serve_bench.py "
          f"--requests {args.requests} --max-tokens {args.max_tokens}`.\n",
          "| concurrency | requests/s | tokens/s | p50 latency s | max latency s | p50 time to first token s |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['latency_p50_s']:.2f} | "
                  f"{r['latency_max_s']:.2f} | {r['first_token_p50_s']:.2f} |")
    (HERE / "RESULTS-serve.md").write_text("\n".join(md) + "\n")
    (HERE / "results" / "serve.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
