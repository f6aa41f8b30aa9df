"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from roe import RoEConfig, RosterOfExperts
from roe.score import continuation_logprobs
from roe.server import Limits, create_app, make_server, serve_limits

KEY = "test-key"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app, graceful_timeout=None, connections=None):
        self.app = app
        self.port = _free_port()
        if graceful_timeout is None and connections is None:
            self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        else:  # `roe serve`'s server: queued jobs answer 503 at shutdown, running ones get graceful_timeout seconds
            self.server = make_server(app, "127.0.0.1", self.port, 10 if graceful_timeout is None else graceful_timeout,
                                      connections)
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


def test_adaptive_k_per_request(client, roster):
    """A request's adaptive K reaches the engine: skipping every token is the base model; skipping none is K."""
    kw = dict(model="tiny", prompt="The cat", max_tokens=6, temperature=0)
    none = {"num_samples": 4, "tau": 0.8, "adaptive_metric": "margin", "adaptive_threshold": 1}
    every = {**none, "adaptive_threshold": 0}
    assert client.completions.create(**kw, extra_body={"roe": every}).choices[0].text == \
        roster.with_config(num_samples=1).generate("The cat", max_new_tokens=6)[0]
    assert client.completions.create(**kw, extra_body={"roe": none}).choices[0].text == \
        roster.with_config(num_samples=4, tau=0.8).generate("The cat", max_new_tokens=6)[0]


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


# ---- OpenAI conformance: token-id prompts, logprobs, echo ----------------------------------------------


def test_token_id_prompts(client, roster):
    ids = [roster.tokenizer("The cat").input_ids, roster.tokenizer("dog!").input_ids]
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    by_text = [c.text for c in client.completions.create(prompt=["The cat", "dog!"], **kw).choices]
    one = client.completions.create(prompt=ids[0], **kw)  # [int]: one prompt
    assert [c.text for c in one.choices] == by_text[:1] and one.usage.prompt_tokens == len(ids[0])
    both = client.completions.create(prompt=ids, **kw)  # [[int]]: a batch
    assert [c.text for c in both.choices] == by_text and [c.index for c in both.choices] == [0, 1]


def test_logprobs_are_those_of_the_distribution_that_picked_the_tokens(client, roster):
    """Same seed, same RoE settings: the reported log-probs are the aggregated distribution's at each step."""
    k4 = roster.with_config(num_samples=4, tau=0.3)
    ids = roster.tokenizer("The cat").input_ids
    for temperature in (0, 1.0):
        out = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=temperature, seed=5,
                                        logprobs=3, extra_body={"roe": {"num_samples": 4, "tau": 0.3}}).choices[0]
        (gen,) = k4.generate_completions("The cat", max_new_tokens=6, do_sample=temperature > 0, seeds=[5])
        assert out.text == gen.text
        (expected, _), = continuation_logprobs(k4, [(ids, gen.token_ids)], [5])
        lp = out.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
        assert lp.token_logprobs == pytest.approx(expected.tolist(), abs=1e-4)
        assert lp.tokens == [roster.tokenizer.decode([t]) for t in gen.token_ids]
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            # the top 3 plus the chosen token, keyed by text (tokens that decode alike share a key: the likeliest's)
            assert top[token] >= value and 1 <= len(top) <= 4
            assert all(v <= 0 for v in top.values())
            if temperature == 0:  # greedy: the chosen token is the most likely one
                assert value == pytest.approx(max(top.values()), abs=1e-6)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    other_seed = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=0, seed=6,
                                           logprobs=0, extra_body={"roe": {"num_samples": 4, "tau": 0.3}})
    assert other_seed.choices[0].logprobs.token_logprobs != pytest.approx(expected.tolist(), abs=1e-4)


def test_echo_scores_the_prompt(client, roster):
    text = "The cat sat"
    ids = roster.tokenizer(text).input_ids
    (expected, _), = continuation_logprobs(roster, [(ids[:1], ids[1:])], [9])
    for max_tokens in (0, 1):
        out = client.completions.create(model="tiny", prompt=text, max_tokens=max_tokens, echo=True, logprobs=2,
                                        temperature=0, seed=9).choices[0]
        lp = out.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and out.text.startswith(text)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected.tolist(), abs=1e-4)
    echoed = client.completions.create(model="tiny", prompt=[ids], max_tokens=3, echo=True, temperature=0)
    assert echoed.choices[0].text == roster.tokenizer.decode(ids) + roster.generate(text, max_new_tokens=3)[0]


def test_logprobs_include_the_eos_that_ended_a_completion(roster):
    """echo + max_tokens 1 (lm-eval's scoring request) must list prompt + 1 tokens even when EOS is picked."""
    ids = roster.tokenizer("ab").input_ids
    (first,) = roster.generate_completions("ab", max_new_tokens=1)  # what greedy picks after "ab"
    eos_roster = roster.with_config()
    eos_roster.eos_token_ids = {first.token_ids[0]}  # make the greedy pick an EOS
    s = _Server(create_app(eos_roster, "tiny", Limits(max_tokens=4, max_prompt_tokens=64)))
    try:
        body = {"model": "tiny", "prompt": "ab", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        choice = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"] == "ab"
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        assert lp["tokens"][-1] == roster.tokenizer.decode([first.token_ids[0]])
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)
        # without echo the log-probs are kept while decoding (no second pass): the same EOS entry, the same value
        kept = httpx.post(s.url + "/v1/completions", json={**body, "echo": False}, timeout=60).json()["choices"][0]
        assert kept["finish_reason"] == "stop" and kept["text"] == ""
        assert kept["logprobs"]["tokens"] == lp["tokens"][-1:]
        assert kept["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][-1:], abs=1e-5)
    finally:
        s.stop()


def test_logprobs_are_kept_while_decoding_without_a_second_pass(client, roster, monkeypatch):
    """Generated tokens' log-probs come from the decode steps that picked them: scoring is not called."""
    import roe.server.scheduler as server_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(server_module, "score_positions", no_scoring)
    out = client.completions.create(model="tiny", prompt="The cat", max_tokens=5, temperature=0, seed=3,
                                    logprobs=2).choices[0]
    assert len(out.logprobs.token_logprobs) == len(out.logprobs.top_logprobs) == 5
    for value, top in zip(out.logprobs.token_logprobs, out.logprobs.top_logprobs):  # greedy: the best is the pick
        assert 1 <= len(top) <= 2 and value == pytest.approx(max(top.values()), abs=1e-6)  # (texts may collide)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2).choices[0]
    content = out.logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content).replace(" ", "") == out.message.content.replace(" ", "")
    for c in content:
        assert len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6)
        assert c.bytes == list(c.token.encode())


def test_tiny_temperature_and_top_p_are_greedy(client, roster):
    greedy = roster.generate("Hello", max_new_tokens=6)[0]
    for extra in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e-6, "top_p": 1e-300}):
        assert client.completions.create(model="tiny", prompt="Hello", max_tokens=6, **extra).choices[0].text == greedy
        pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="Hello", max_tokens=6,
                                                                       stream=True, **extra)]
        assert "".join(pieces) == greedy


# ---- bad input: a clear 400 in the OpenAI error format ------------------------------------------------


def _post(server, path, body=None, content=None, key=KEY, headers=None):
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=30)


BASE = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({**BASE, "max_tokens": "many"}, 400, "max_tokens"),
        ({**BASE, "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
        ({**BASE, "max_tokens": 0}, 400, "0 only with echo"),
        ({**BASE, "roe": {"num_samples": 0}}, 400, "num_samples"),
        ({**BASE, "roe": {"num_samples": True}}, 400, "roe.num_samples: Input should be a valid integer"),
        ({**BASE, "n": True}, 400, "n: Input should be a valid integer"),
        ({**BASE, "temperature": True}, 400, "temperature"),
        ({**BASE, "roe": {"tau": -0.2}}, 400, "tau must be >= 0"),
        ({**BASE, "roe": {"tau": 1e308}}, 400, "tau must be <= 10"),
        ({**BASE, "roe": {"tau": [0.1, 11, 0.1, 0.1]}}, 400, "tau must be <= 10"),
        ({**BASE, "roe": {"tau": "0.3"}}, 400, "roe.tau: tau must be a number or a non-empty list"),
        ({**BASE, "roe": {"tau": [0.1, 0.2]}}, 400, "tau has 2 values but the model has 4 MoE layers"),
        ({**BASE, "roe": {"temperature": 2}}, 400, "unsupported parameter: roe.temperature"),
        ({**BASE, "roe": {"adaptive_metric": "entropy"}}, 400, "needs a finite number adaptive_threshold"),
        ({**BASE, "roe": {"adaptive_metric": "margin", "adaptive_threshold": 2}}, 400, "in [0, 1]"),
        ({**BASE, "roe": {"adaptive_metric": "off", "adaptive_threshold": 0.5}}, 400, "drop one of them"),
        ({**BASE, "roe": {"adaptive_metric": "entropy", "adaptive_threshold": 1, "cache": "full"}}, 400,
         "adaptive_metric needs cache='clean'"),
        ({**BASE, "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist; this server serves 'tiny'"),
        ({**BASE, "roe": {"num_samples": 17}}, 400, "at most 16"),
        ({**BASE, "max_tokens": 33}, 400, "at most 32"),
        ({**BASE, "prompt": "x" * 65}, 400, "the prompt has 65 tokens; this server allows at most 64"),
        ({**BASE, "prompt": "x" * 50_000}, 400, "the prompt has 50000 characters"),
        ({**BASE, "prompt": [[5] * 65]}, 400, "the prompt has 65 tokens; this server allows at most 64"),
        ({**BASE, "prompt": ""}, 400, "prompt is empty"),
        ({**BASE, "prompt": []}, 400, "prompt is an empty list"),
        ({**BASE, "prompt": [[]]}, 400, "empty list of token ids"),
        ({**BASE, "prompt": [5, 1.5]}, 400, "prompt must be a string, a list of strings, a list of token ids"),
        ({**BASE, "prompt": [5, True]}, 400, "prompt must be a string"),
        ({**BASE, "prompt": ["a", [5]]}, 400, "prompt must be a string"),
        ({**BASE, "prompt": [[5], [99999]]}, 400, "prompt 1: token id 99999 is out of range"),
        ({**BASE, "prompt": [-1]}, 400, "token id -1 is out of range"),
        ({**BASE, "prompt": ["a"] * 9, "n": 8}, 400, "asks for 72 completions (9 prompts x n=8); this server queues at most 64"),
        ({**BASE, "prompt": ["a"] * 65}, 400, "65 prompts; this server allows at most 64"),
        ({**BASE, "seed": 2**70}, 400, "seed must be an integer in [0, 2**63)"),
        ({**BASE, "seed": -1}, 400, "seed must be an integer in [0, 2**63)"),
        ({**BASE, "seed": 2**63 - 1, "n": 2}, 400, "seed + n - 1 must be < 2**63"),
        ({**BASE, "logprobs": 21}, 400, "logprobs"),
        ({**BASE, "logprobs": 1, "stream": True}, 400, "logprobs are not supported with stream"),
        ({**BASE, "stop": ["s"] * 17}, 400, "at most 16 stop sequences"),
        ({**BASE, "stop": 5}, 400, "stop must be a string or a list of strings"),
        ({**BASE, "stop": ["x" * 4000] * 16}, 400, "the stop sequences have 64000 characters in all; this server "
         "allows at most 4096"),
        ({**BASE, "stop": "x" * 4097}, 400, "stop: the stop sequences have 4097 characters"),
        ({**BASE, "frequency_penalty": 1}, 400, "frequency_penalty and presence_penalty are not supported"),
        ({**BASE, "best_of": 2}, 400, "unsupported parameter: best_of"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
         "top_logprobs needs logprobs: true"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 50_000}]}, 400, "characters"),
    ],
)
def test_bad_requests(server, body, status, message):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error", err
    assert "Value error" not in err["message"] and "must be a JSON object" not in err["message"]


def test_openai_client_gets_clear_400s(client):
    """What can never succeed is a 400 (the client does not retry it), with the limit and no pydantic prefixes."""
    retrying = client.with_options(max_retries=3)
    cases = [
        (dict(prompt=["a"] * 9, n=8), "asks for 72 completions (9 prompts x n=8); this server queues at most 64"),
        (dict(prompt="hi", frequency_penalty=0.5), "frequency_penalty and presence_penalty are not supported"),
        (dict(prompt="hi", seed=2**70), "seed: seed must be an integer in [0, 2**63)"),
        (dict(prompt="hi", extra_body={"roe": {"tau": 1e308}}), "roe.tau: tau must be <= 10"),
        (dict(prompt=[[5, 6], [7, 1000]]), "prompt 1: token id 1000 is out of range"),
    ]
    for kw, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            retrying.completions.create(model="tiny", max_tokens=2, **kw)
        assert e.value.status_code == 400 and message in e.value.message
        assert "Value error" not in e.value.message and "JSON object" not in e.value.message


def test_seed_at_the_top_of_the_range_is_accepted(client):
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2, seed=2**63 - 1)
    assert out.usage.completion_tokens == 2


def test_malformed_bodies_and_auth(server):
    for content in (b'{"model": "tiny", "prompt": ', b'{"model": "tiny", "prompt": "\xff\xfe"}', b"hello",
                    b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', b"[" * 100_000):
        r = _post(server, "/v1/completions", content=content)
        assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON", content
    r = _post(server, "/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body must be a JSON object"
    too_big = server.app.state.max_body_bytes + 1
    r = _post(server, "/v1/completions", content=b" " * too_big)
    assert r.status_code == 413 and "larger than this server's limit" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", BASE, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _post(server, "/v1/completions", BASE, key="wrong")
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # /health needs no key
    for path in ("/docs", "/openapi.json", "/redoc"):  # no API description without the key, none at all with it
        assert httpx.get(server.url + path).status_code == 401
        r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "method GET is not allowed" in r.json()["error"]["message"]


# ---- OpenAI conventions ---------------------------------------------------------------------------------


def test_sampled_requests_without_a_seed_draw_one_and_return_it(server, roster):
    sampled = {**BASE, "prompt": "abc", "max_tokens": 10, "temperature": 1.5}
    answers = [_post(server, "/v1/completions", sampled) for _ in range(3)]
    seeds = [r.json()["seed"] for r in answers]
    assert all(r.status_code == 200 and r.headers["x-roe-seed"] == str(r.json()["seed"]) for r in answers)
    assert len(set(seeds)) == 3 and len({r.json()["choices"][0]["text"] for r in answers}) > 1
    again = _post(server, "/v1/completions", {**sampled, "seed": seeds[0]}).json()
    assert again["seed"] == seeds[0] and again["choices"][0]["text"] == answers[0].json()["choices"][0]["text"]
    greedy = [_post(server, "/v1/completions", {**sampled, "temperature": 0}).json() for _ in range(2)]
    assert greedy[0]["seed"] == greedy[1]["seed"] == roster.config.seed  # greedy: the same noise, the same text
    assert greedy[0]["choices"][0]["text"] == greedy[1]["choices"][0]["text"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                            "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and int(r.headers["x-roe-seed"]) >= 0
        r.read()


def test_models_by_id_and_model_not_found(server, client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_chat_max_tokens_defaults_to_what_fits(server, roster):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    assert _post(server, "/v1/chat/completions", chat).json()["usage"]["completion_tokens"] == 32  # --max-tokens
    s = _Server(create_app(roster, "tiny", Limits(max_tokens=127, max_prompt_tokens=64)))
    try:  # the context (128) is the bound: the prompt's tokens plus the completion's fill it
        usage = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=120).json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == roster.max_context == 128
        completion = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "temperature": 0},
                                timeout=60).json()
        assert completion["usage"]["completion_tokens"] == 16  # completions keep OpenAI's default of 16
    finally:
        s.stop()


def test_neutral_fields_are_accepted_and_others_refused_by_name(server):
    plain = _post(server, "/v1/completions", {**BASE, "temperature": 0}).json()["choices"][0]["text"]
    neutral = {"logit_bias": {}, "response_format": {"type": "text"}, "parallel_tool_calls": True, "best_of": 1,
               "tools": [], "tool_choice": "none", "store": False, "metadata": {"a": "b"}, "service_tier": "auto",
               "user": "u", "suffix": "", "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0}
    r = _post(server, "/v1/completions", {**BASE, "temperature": 0, **neutral})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain, r.text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "modalities": ["text"],
            "logit_bias": None, "parallel_tool_calls": False, "response_format": {"type": "text"}}
    assert _post(server, "/v1/chat/completions", chat).status_code == 200
    for field, value in [("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}), ("suffix", "x"),
                         ("tools", [{"type": "function"}]), ("tool_choice", "required"), ("best_of", 3)]:
        r = _post(server, "/v1/completions", {**BASE, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)


def test_auth_scheme_is_case_insensitive(server):
    for header, status in [(f"bearer {KEY}", 200), (f"BEARER {KEY}", 200), (f"Bearer  {KEY}", 200),
                           (f"Basic {KEY}", 401), (KEY, 401), ("Bearer", 401), (f"Bearer {KEY}x", 401)]:
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == status, header


def test_lone_surrogates_are_named(server):
    for path, content, where in [("/v1/completions", b'{"model": "tiny", "prompt": "ab\\ud800c"}', "prompt"),
                                 ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", '
                                  b'"content": "x\\udfff"}]}', "messages.0.content")]:
        r = _post(server, path, content=content)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == where, r.text
        assert err["message"].startswith(f"{where}: character ") and "half of a UTF-16 surrogate pair" in err["message"]
    pair = b'{"model": "tiny", "prompt": "ab\\ud83d\\ude00", "max_tokens": 2}'  # both halves: an emoji
    assert _post(server, "/v1/completions", content=pair).status_code == 200


def test_serve_limits_fit_the_context():
    from argparse import Namespace

    flags = dict(max_k=64, max_queue=64)
    limits = serve_limits(Namespace(max_tokens=None, max_prompt_tokens=None, **flags), 512)
    assert (limits.max_tokens, limits.max_prompt_tokens) == (511, 511)  # 512 could never succeed in a 512 context
    assert serve_limits(Namespace(max_tokens=None, max_prompt_tokens=None, **flags), 8192).max_tokens == 512
    for bad in (dict(max_tokens=512, max_prompt_tokens=None), dict(max_tokens=None, max_prompt_tokens=600),
                dict(max_tokens=0, max_prompt_tokens=None)):
        with pytest.raises(ValueError, match="--max-"):
            serve_limits(Namespace(**bad, **flags), 512)


def test_docs_open_without_a_key(roster):
    s = _Server(create_app(roster, "tiny", Limits(max_tokens=4)))
    try:
        assert httpx.get(s.url + "/openapi.json").status_code == 200
        assert httpx.post(s.url + "/v1/completions", json={**BASE, "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        s.stop()


# ---- load: queue limits, cancellation, shutdown -------------------------------------------------------


def test_queue_limit_answers_429_without_hanging(roster):
    s = _Server(create_app(roster, "tiny", Limits(max_queue=2, max_tokens=32)))
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                reqs = [c.post(s.url + "/v1/completions", json={**BASE, "max_tokens": 32, "roe": {"tau": 0.1 * i}})
                        for i in range(12)]  # different settings: no batching, so the queue fills
                return await asyncio.gather(*reqs)

        responses = asyncio.run(main())
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 429)
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def _poll(url, done, tries=200):
    """Poll /health until done(json) (at most `tries` x 50 ms); the last answer."""
    for _ in range(tries):
        h = httpx.get(url + "/health").json()
        if done(h):
            return h
        time.sleep(0.05)
    return h


def test_clients_that_leave_free_the_queue_and_the_worker(roster, monkeypatch):
    """Queued jobs of clients that gave up are dropped; a running batch whose stream closed stops early."""
    import roe.server.scheduler as server_module

    steps = []  # per batch the worker ran: decode steps taken
    real = server_module.decode_steps

    def slow(*args, **kwargs):
        steps.append(0)
        for outs in real(*args, **kwargs):
            time.sleep(0.1)  # a slow model: 32 steps would take 3.2 s
            steps[-1] += 1
            yield outs

    monkeypatch.setattr(server_module, "decode_steps", slow)
    s = _Server(create_app(roster, "tiny", Limits(max_tokens=32)))
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                long = {**BASE, "max_tokens": 32, "stream": True}
                async with c.stream("POST", s.url + "/v1/completions", json=long) as r:
                    lines = r.aiter_lines()  # (breaking out of an `async for` over it would close the stream)
                    while not (await lines.__anext__()).startswith("data: "):
                        pass  # the long job is running once its first piece arrives
                    async with httpx.AsyncClient(timeout=0.3) as impatient:
                        async def give_up(i):
                            with pytest.raises(httpx.TimeoutException):
                                await impatient.post(s.url + "/v1/completions",
                                                     json={**BASE, "max_tokens": 32, "roe": {"tau": 0.05 * i}})
                        await asyncio.gather(*[give_up(i) for i in range(1, 7)])
                    queued = await asyncio.to_thread(_poll, s.url, lambda h: h["queued"] == 0)
                # the stream is closed here
                after = await asyncio.to_thread(_poll, s.url, lambda h: h["running"] == 0)
                small = await c.post(s.url + "/v1/completions", json={**BASE, "max_tokens": 2})
                return queued, after, small

        queued, after, small = asyncio.run(main())
        assert queued["queued"] == 0 and queued["running"] == 1  # dropped while the long job still ran
        assert after == {"status": "ok", "queued": 0, "running": 0}
        assert small.status_code == 200
        assert len(steps) == 2 and steps[0] < 32  # the six never ran; the long one was cut short
    finally:
        s.stop()


def test_shutdown_answers_queued_503_and_bounds_the_wait(roster, monkeypatch):
    """Shutdown (what SIGTERM triggers; tests/test_server_process.py sends a real one): queued jobs answer 503 at
    once, new ones too, and a running job that outlasts the graceful timeout answers 503 instead of a hang."""
    import roe.server.scheduler as server_module

    real = server_module.decode_steps

    def slow(*args, **kwargs):
        for outs in real(*args, **kwargs):
            time.sleep(0.1)  # 32 steps: 3.2 s, longer than the 0.5 s graceful timeout
            yield outs

    monkeypatch.setattr(server_module, "decode_steps", slow)
    s = _Server(create_app(roster, "tiny", Limits(max_tokens=32)), graceful_timeout=0.5)
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                reqs = [asyncio.ensure_future(c.post(s.url + "/v1/completions",
                                                     json={**BASE, "max_tokens": 32, "roe": {"tau": 0.05 * i}}))
                        for i in range(4)]
                health = await asyncio.to_thread(_poll, s.url, lambda h: h["queued"] == 3)
                s.server.should_exit = True
                return health, [await r for r in reqs]

        health, done = asyncio.run(main())
        assert health["queued"] == 3 and health["running"] == 1
        assert [r.status_code for r in done] == [503] * 4
        messages = sorted(r.json()["error"]["message"] for r in done)
        assert messages == ["the server is shutting down; this request was not started"] * 3 + [
            "the server shut down before this request finished"]
        s.thread.join(30)
        scheduler = s.app.state.scheduler
        scheduler.thread.join(30)  # the cut-off job stopped at its next step and the closed worker ended
        assert not s.thread.is_alive() and not scheduler.thread.is_alive() and not scheduler.jobs
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
        for line in lines[:-1]:
            text += json.loads(line[6:])["choices"][0]["text"]
        return i, text

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[one(c, i) for i in range(50)])

    results = asyncio.run(main())
    expected = {p: roster.generate(f"p{p}", max_new_tokens=10)[0] for p in range(5)}
    assert all(text == expected[i % 5] for i, text in results)
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "queued": 0, "running": 0}
