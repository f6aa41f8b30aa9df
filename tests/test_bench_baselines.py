"""`roe bench` against what users would otherwise run: transformers' own generate, eager and with a static cache
(compiled by transformers on CUDA), measured in the same run; every row's ratio to hf-compiled; the batched row
set; compile time; power and energy per token through NVML, null with a reason where it cannot be read. Checked
from the JSON; no assertion depends on how fast anything ran."""

import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from roe import RosterOfExperts, bench
from roe.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 3


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--model", "builtin", "-k", "1,2", "--prompt-tokens", "6", "--new-tokens", str(TOKENS),
                 "--cache", "clean", "--independent-k", "", "--naive-k", "", "--batch-sizes", "1,16",
                 "--batch-k", "2", "--compile", "off", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def roster():
    return RosterOfExperts.from_pretrained("builtin", compile="off")


def _hf(rows, batch):
    (row,) = [r for r in rows if r["method"] == "hf-compiled" and r["batch"] == batch]
    return row


def test_hf_rows_are_measured_in_the_same_run(doc):
    rows = doc["rows"]
    assert doc["complete"] is True and doc["compile"] == "off"
    assert {"torch", "transformers"} <= set(doc["versions"])
    hf = [r for r in rows if r["method"] in ("hf-eager", "hf-compiled")]
    assert {(r["method"], r["batch"]) for r in hf} == {(m, b) for m in ("hf-eager", "hf-compiled") for b in (1, 16)}
    for r in hf:
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["prefill_ms"] > 0
        assert r["new_tokens"] == TOKENS and r["k"] == 1 and r["peak_mem_bytes"] > 0
    compiled = _hf(rows, 1)
    assert compiled["cache"] == "static"
    # transformers compiles generate's decode step on CUDA/XPU only: here the row says it ran eagerly, and why
    assert compiled["compiled"] is False and compiled["compile_s"] is None
    assert "cpu" in compiled["note"] and "eagerly" in compiled["note"]
    assert all(r["compiled"] is False and r["compile_s"] is None for r in rows)  # --compile off, on the CPU


def test_every_row_has_its_ratio_to_hf_compiled_and_base(doc):
    rows = doc["rows"]
    for r in rows:
        hf = _hf(rows, r["batch"])
        base = max((b for b in rows if b["method"] == "base" and b["batch"] == r["batch"]),
                   key=lambda b: b["tokens_per_s"])
        assert math.isclose(r["x_hf_compiled"], r["tokens_per_s"] / hf["tokens_per_s"], rel_tol=1e-9)
        assert math.isclose(r["x_base"], r["tokens_per_s"] / base["tokens_per_s"], rel_tol=1e-9)
    assert sum(r["method"] == "roe" for r in rows) == 3  # K = 1 and 2, and the batched K = 2


def test_batched_rows_decode_16_prompts_together(doc):
    rows = doc["rows"]
    batched = [r for r in rows if r["batch"] == 16]
    assert {(r["method"], r["k"]) for r in batched} == {("base", 1), ("hf-eager", 1), ("hf-compiled", 1), ("roe", 2)}
    for r in batched:  # tokens/s counts the tokens of all 16 prompts; ms/token is one decode step
        decode_s = r["ms_per_token"] * r["new_tokens"] / 1000
        assert math.isclose(r["tokens_per_s"] * decode_s, 16 * r["new_tokens"], rel_tol=1e-9)
    one = next(r for r in rows if r["method"] == "roe" and r["k"] == 2 and r["batch"] == 1)
    many = next(r for r in batched if r["method"] == "roe")
    assert many["kv_cache_bytes"] == 16 * one["kv_cache_bytes"]  # clean cache: one history per prompt
    assert many["distinct_experts_per_layer"] is None  # the per-token counts are single-prompt figures


def test_power_fields_are_null_with_a_reason_without_nvml(doc):
    assert doc["power"].startswith("not measured")
    for r in doc["rows"]:
        assert r["power_w"] is None and r["energy_j_per_token"] is None
        assert r["power_note"] == doc["power"]


class FakeMeter:
    """Energy that grows by 0.5 J per reading."""

    note = "fake energy counter"

    def __init__(self):
        self.joules = 100.0

    def energy(self):
        self.joules += 0.5
        return self.joules


@pytest.mark.parametrize("method", ["base", "hf-eager", "roe"])
def test_power_and_energy_per_token_come_from_the_decode_loop(roster, method):
    prompt = torch.randint(4, 700, (2, 5), generator=torch.Generator().manual_seed(0))
    row = bench.measure(roster, method, 2 if method == "roe" else 1, "clean" if method == "roe" else None, prompt,
                        TOKENS, meter=FakeMeter())
    assert row.batch == 2 and row.power_note == "fake energy counter"
    decode_s = row.ms_per_token * TOKENS / 1000
    joules = row.energy_j_per_token * 2 * TOKENS  # per generated token, both prompts
    assert joules == pytest.approx(0.5)  # one reading at the start of the decode loop, one at its end
    assert row.power_w == pytest.approx(joules / decode_s)


def _fake_pynvml(energy=True):
    nvml = types.ModuleType("pynvml")
    state = {"mj": 1_000_000, "init": 0, "shutdown": 0}

    def total(handle):
        if not energy:
            raise RuntimeError("not supported")
        state["mj"] += 250
        return state["mj"]

    nvml.nvmlInit = lambda: state.__setitem__("init", state["init"] + 1)
    nvml.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nvml.nvmlDeviceGetTotalEnergyConsumption = total
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 300_000  # mW
    return nvml, state


def test_power_meter_reads_the_nvml_energy_counter(monkeypatch):
    nvml, state = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(bench, "_nvml_index", lambda device: 0)
    meter = bench.PowerMeter(torch.device("cuda", 0))
    assert "energy counter" in meter.note
    a, b = meter.energy(), meter.energy()
    assert b - a == pytest.approx(0.25)  # mJ -> J
    meter.close()
    assert state["init"] == 1 and state["shutdown"] == 1 and meter.energy() is None


def test_power_meter_integrates_sampled_power_without_a_counter(monkeypatch):
    nvml, _ = _fake_pynvml(energy=False)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(bench, "_nvml_index", lambda device: 0)
    meter = bench.PowerMeter(torch.device("cuda", 0))
    assert "sampled" in meter.note
    first = meter.energy()
    for _ in range(2000):  # until the sampling thread (every 5 ms) has integrated a sample
        if meter.energy() != first:
            break
        time.sleep(0.005)
    assert meter.energy() > first
    meter.close()


def test_power_meter_without_pynvml_or_cuda_says_why(monkeypatch):
    assert "cpu" in bench.PowerMeter(torch.device("cpu")).note
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine without nvidia-ml-py
    meter = bench.PowerMeter(torch.device("cuda", 0))
    assert meter.energy() is None and "nvidia-ml-py" in meter.note


def test_compile_time_is_the_first_run_minus_the_kept_run(roster, monkeypatch):
    """A row whose decode step compiled is run once untimed first; compile_s is that run's wall time minus the
    kept run's. The engine's compiled step is stood in for: RoE rows report what RoEPass.compiled says."""
    real = bench.run_roe

    def compiled_roe(*args, **kwargs):
        run, p = real(*args, **kwargs)
        run.compiled = True
        return run, p

    monkeypatch.setattr(bench, "run_roe", compiled_roe)
    monkeypatch.setattr(bench, "may_compile", lambda roster: True)
    logs, saved = [], []
    rows = bench.run_bench(roster, [2], ["clean"], 6, TOKENS, [], 0, [], warmup=False, batch_sizes=(1,),
                           log=logs.append, checkpoint=lambda rows, complete: saved.append((len(rows), complete)))
    roe = next(r for r in rows if r.method == "roe")
    assert roe.compiled and roe.compile_s is not None and roe.compile_s >= 0
    hf = next(r for r in rows if r.method == "hf-compiled")
    assert not hf.compiled and hf.compile_s is None  # measured, but nothing compiled on the CPU
    firsts = [line for line in logs if line.startswith("[bench] first run of")]
    assert len(firsts) == 2 and any("roe K=2" in line for line in firsts)  # RoE and hf-compiled
    # the JSON is rewritten after every measurement: a run cut short keeps its rows
    assert saved == [(n, False) for n in range(1, len(rows) + 1)] + [(len(rows), True)]


def test_hf_rows_run_without_roe_hooks_and_put_them_back(roster, monkeypatch):
    seen = []
    real = roster.model.generate

    def generate(*args, **kwargs):
        seen.append(getattr(roster.model, "_roe_hooks", None))
        return real(*args, **kwargs)

    monkeypatch.setattr(roster.model, "generate", generate)
    prompt = torch.randint(4, 700, (1, 5), generator=torch.Generator().manual_seed(0))
    bench.measure(roster, "hf-eager", 1, None, prompt, TOKENS)
    assert seen == [None]  # the model as a user has it
    assert roster.model._roe_hooks  # and RoE's hooks back for the next row


def test_table_without_rich_and_the_report(doc, tmp_path, monkeypatch, capsys):
    rows = [bench.BenchRow(**r) for r in doc["rows"]]
    monkeypatch.setitem(sys.modules, "rich.console", None)  # a machine with torch and transformers only
    bench.print_table(rows, "title")
    out = capsys.readouterr().out
    assert "x hf-compiled" in out and "hf-eager" in out and "note: power: not measured" in out
    path = tmp_path / "perf-test.json"
    path.write_text(json.dumps(doc))
    md = tmp_path / "report.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf_report.py"), "--md", str(md), str(path)],
                   check=True, capture_output=True)
    text = md.read_text()
    assert "| x hf-compiled tok/s |" in text and "| J/token x hf-compiled |" in text
    assert "16 prompts batched, RoE K = 2" in text and "RoE K = 2, clean cache" in text
    floor = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bandwidth_floor.py"), str(path)],
                           check=True, capture_output=True, text=True).stdout
    assert "| hf-compiled | 1 | static |" in floor
