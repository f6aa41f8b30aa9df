"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from roe import RoEConfig, RosterOfExperts
from roe.server import Limits, create_app

KEY = "test-key"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def roster(tiny_path):
    r = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=4, tau=0.3))
    r.eos_token_ids = set()  # random weights: run to max_tokens, so outputs are comparable
    return r


@pytest.fixture(scope="module")
def server(roster):
    s = _Server(create_app(roster, "tiny", Limits(max_k=16, max_tokens=32, max_prompt_tokens=64, max_queue=64), KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_completions_and_chat(client, roster):
    out = client.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0,
                                    extra_body={"roe": {"num_samples": 4, "tau": 0.3}})
    expected = roster.generate("The cat", max_new_tokens=8)[0]
    assert out.choices[0].text == expected
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == len(roster.tokenizer("The cat").input_ids)
    assert out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == roster.generate("User: hi\nAssistant:", max_new_tokens=6)[0]
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="Hello", max_tokens=12, temperature=0.9, seed=3,
              extra_body={"roe": {"num_samples": 8, "tau": 0.5, "cache": "full"}})
    whole = client.completions.create(**kw).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw)]
    assert len(pieces) > 2 and "".join(pieces) == whole
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"


def test_seed_reproducible_and_n(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=10, temperature=1.2, extra_body={"roe": {"tau": 0.6}})
    a = client.completions.create(seed=11, **kw).choices[0].text
    assert client.completions.create(seed=11, **kw).choices[0].text == a
    many = client.completions.create(seed=11, n=3, **kw)
    assert len(many.choices) == 3 and many.choices[0].text == a
    assert len({c.text for c in many.choices}) > 1
    stopped = client.completions.create(seed=11, stop=[a[4:6]], **kw).choices[0]
    assert stopped.text == a[: a.find(a[4:6])] and stopped.finish_reason == "stop"


def _post(server, path, body=None, content=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=30)


BASE = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({**BASE, "max_tokens": "many"}, 400, "max_tokens"),
        ({**BASE, "roe": {"num_samples": 0}}, 400, "num_samples"),
        ({**BASE, "roe": {"tau": -0.2}}, 400, "tau must be >= 0"),
        ({**BASE, "roe": {"tau": [0.1, 0.2]}}, 400, "tau has 2 values but the model has 4 MoE layers"),
        ({**BASE, "roe": {"temperature": 2}}, 400, "roe.temperature"),
        ({**BASE, "model": "gpt-4"}, 400, "unknown model 'gpt-4'"),
        ({**BASE, "roe": {"num_samples": 17}}, 400, "at most 16"),
        ({**BASE, "max_tokens": 33}, 400, "at most 32"),
        ({**BASE, "prompt": "x" * 65}, 400, "at most 64"),
        ({**BASE, "prompt": ""}, 400, "prompt is empty"),
        ({**BASE, "logprobs": 2}, 400, "not supported"),
        ({**BASE, "best_of": 2}, 400, "best_of"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests(server, body, status, message):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_and_auth(server):
    r = _post(server, "/v1/completions", content=b'{"model": "tiny", "prompt": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"hello", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", BASE, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _post(server, "/v1/completions", BASE, key="wrong")
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_queue_limit_answers_429_without_hanging(roster):
    s = _Server(create_app(roster, "tiny", Limits(max_queue=2, max_tokens=32)))
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                reqs = [c.post(s.url + "/v1/completions", json={**BASE, "max_tokens": 32, "roe": {"tau": 0.1 * i}})
                        for i in range(12)]  # different settings: no batching, so the queue fills
                return await asyncio.gather(*reqs)

        codes = [r.status_code for r in asyncio.run(main())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_fifty_concurrent_streams(server, roster):
    async def one(c, i):
        body = {**BASE, "prompt": f"p{i % 5}", "max_tokens": 10, "temperature": 0, "stream": True}
        text = ""
        async with c.stream("POST", server.url + "/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        import json

        for line in lines[:-1]:
            text += json.loads(line[6:])["choices"][0]["text"]
        return i, text

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[one(c, i) for i in range(50)])

    results = asyncio.run(main())
    expected = {p: roster.generate(f"p{p}", max_new_tokens=10)[0] for p in range(5)}
    assert all(text == expected[i % 5] for i, text in results)
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "queued": 0}
