"""The `roe` command: generate, eval, tune, bench and errors, run in-process."""

import json

from roe.cli import main

ARGS = ["--model", "builtin", "-k", "2", "--tau", "0.3", "--skip-layers", "1", "--seed", "0"]


def test_generate_prints_the_completion(capsys):
    assert main(["generate", "x = 2\nprint(x + 3)\n# Output:\n", *ARGS, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.strip()


def test_errors_exit_2_with_one_line(capsys):
    assert main(["generate", "", *ARGS]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "builtin", "-k", "0"]) == 2
    assert "num_samples" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "builtin", "--tau", "0.1,0.2"]) == 2
    assert "tau has 2 values" in capsys.readouterr().err


def test_eval_writes_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "builtin", "--task", "math,choice", "-k", "1,2", "--seeds", "2", "--limit", "3",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["task"], r["k"]) for r in data["summary"]} == {("math", 1), ("math", 2), ("choice", 1), ("choice", 2)}
    assert len(data["rows"]) == 2 * (1 + 2)
    assert "math" in capsys.readouterr().out


def test_tune_writes_profile_and_plots(tmp_path):
    out = tmp_path / "tuned.json"
    db = tmp_path / "study.db"
    common = ["tune", "--model", "builtin", "--task", "math", "--objective", "ppl", "-k", "2", "--max-tau", "0.5",
              "--skip-layers", "1", "--val-examples", "4", "--seed", "0", "-o", str(out), "--storage", f"sqlite:///{db}"]
    assert main([*common, "--trials", "3"]) == 0
    profile = json.loads(out.read_text())
    assert profile["trials"] == 3 and len(profile["tau"]) == 4 and profile["tau"][0] == 0 == profile["tau"][-1]
    assert profile["validation_score"] <= profile["validation_score_base"]
    assert (tmp_path / "tuned_history.png").exists() and (tmp_path / "tuned_tau_heatmap.png").exists()
    assert main([*common, "--trials", "4"]) == 0  # resumes the stored study: one more trial
    assert json.loads(out.read_text())["trials"] == 4


def test_bench_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "builtin", "-k", "1,4", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--cache", "clean,full", "--independent-k", "2", "--naive-k", "2", "--naive-tokens", "2",
                 "--experts-impls", "eager", "--ablations", "--repeats", "2", "--batch-sizes", "1", "--dtype", "float32",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    keys = {"method", "k", "cache", "tokens_per_s", "ms_per_token", "prefill_ms", "peak_mem_bytes", "kv_cache_bytes",
            "distinct_experts_per_layer"}
    assert all(keys <= set(r) for r in rows)
    assert {r["method"] for r in rows} == {"base", "hf-eager", "hf-compiled", "roe", "independent", "naive"}
    clean = {r["k"]: r["kv_cache_bytes"] for r in rows if r["method"] == "roe" and r["cache"] == "clean" and r["new_tokens"] == 4}
    assert clean[1] == clean[4]
    roe4 = next(r for r in rows if r["method"] == "roe" and r["k"] == 4 and r["engine"] == "optimised")
    base = next(r for r in rows if r["method"] == "base")
    assert base["distinct_experts_per_layer"] == 4  # one row: its top-4, every layer
    assert base["kernels_per_token"] > 0 and roe4["kernels_per_token"] > 0
    assert roe4["distinct_experts_per_layer"] > 4
    # noisy rows touch more experts, so a step must read more weights; never more than the whole model
    from roe.builtin import builtin_path
    from safetensors.torch import load_file
    model_bytes = sum(t.numel() * t.element_size() * 2 for t in load_file(builtin_path() / "model.safetensors").values())
    assert base["weight_bytes_per_token"] < roe4["weight_bytes_per_token"] < model_bytes  # (bf16 file, fp32 model)
    full = {r["engine"]: r["kv_cache_bytes"] for r in rows if r["method"] == "roe" and r["k"] == 4 and r["cache"] == "full"}
    assert full["no shared layers"] > full["optimised"]  # layer 0 keeps one history per prompt, not per sample
    eager = [r for r in rows if r["experts"] == "eager"]
    assert {(r["method"], r["k"]) for r in eager} == {("base", 1), ("roe", 4)}
    assert {r["engine"] for r in rows if r["method"] == "roe" and r["k"] == 4} == {
        "optimised", "no shared layers", "history copied K times", "transformers' expert dispatch", "none of these"}
    assert all(r["repeats"] == 2 and r["ms_per_token_min"] <= r["ms_per_token"] <= r["ms_per_token_max"] for r in rows)


def test_export_tasks(tmp_path, capsys):
    assert main(["export-tasks", "--out", str(tmp_path), "-n", "5"]) == 0
    assert (tmp_path / "math_test.jsonl").read_text().count("\n") == 5
    assert "choice_train.jsonl" in capsys.readouterr().out
