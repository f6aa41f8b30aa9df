"""The real `lm_eval` command with `--model roe`, on a local YAML task over local JSONL files (no hub).

K = 1 must give lm-eval's own `hf` model's numbers on the same checkpoint with the same model_args, for all three
request types, and generate exactly the strings `hf` generates (float32 here; 16-bit: test_lm_eval_bf16.py)."""

import pytest
from lm_eval_tasks import CHOICE, PPL, generate_until, run_lm_eval, write_builtin_data, write_task

from roe import builtin_path

TASKS = {  # name: (data file, task body)
    "roe_local_choice": ("choice", CHOICE),
    "roe_local_math": ("math", generate_until(["\n\n", "Question:"], 64, final_answer_filter=True)),
    "roe_local_math_short": ("math", generate_until(["."], 12)),
    "roe_local_ppl": ("ppl", PPL),
}
GENERATED = ("roe_local_math", "roe_local_math_short")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    write_builtin_data(d, choice=12, math=6, ppl=4)
    for task, (data, body) in TASKS.items():
        write_task(d, task, data, body)
    return d


def _lm_eval(task_dir, out, model, model_args):
    """lm-eval's results and, per generate_until task, the generated string of each document."""
    results, samples = run_lm_eval(task_dir, out, model, model_args, list(TASKS))
    return results["results"], {task: samples[task] for task in GENERATED}


def _metrics(results):
    return {(task, k): v for task, r in results.items() for k, v in r.items()
            if isinstance(v, float) and "stderr" not in k}


def test_roe_model_through_lm_eval_matches_hf_at_k1(task_dir, tmp_path):
    args = f"pretrained={builtin_path('s')},dtype=float32"  # the same model_args for both (roe adds only K)
    hf, hf_text = _lm_eval(task_dir, tmp_path / "hf", "hf", args)
    roe1, roe1_text = _lm_eval(task_dir, tmp_path / "roe1", "roe", args + ",num_samples=1")
    hf, roe1 = _metrics(hf), _metrics(roe1)
    assert hf.keys() == roe1.keys() and len(hf) >= 5
    for key in hf:
        assert roe1[key] == pytest.approx(hf[key], rel=1e-4, abs=1e-6), key
    # two groups of generation arguments, each batched by 4: every string equal, in lm-eval's order
    assert {t: len(v) for t, v in hf_text.items()} == {"roe_local_math": 6, "roe_local_math_short": 6}
    assert roe1_text == hf_text
    assert roe1_text["roe_local_math"] != roe1_text["roe_local_math_short"]
    roe8, _ = _lm_eval(task_dir, tmp_path / "roe8", "roe", args + ",num_samples=8,tau=0.5,skip_layers=1")
    roe8 = _metrics(roe8)
    assert roe8.keys() == hf.keys()
    assert any(roe8[k] != hf[k] for k in hf if "perplexity" in k[1] or "bits" in k[1])
