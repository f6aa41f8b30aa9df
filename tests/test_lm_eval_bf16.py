"""`--model roe` against lm-eval's `hf` on a 16-bit checkpoint, through the real `lm_eval` command.

The same model_args load the same dtype (`dtype=auto`: the checkpoint's bfloat16 for both), and with K = 1 `roe`
should generate exactly the strings `hf` generates. The four documents are one batch (of 4) of the first 40
built-in math test items, the batch in which the strings differed while RoE's dense expert dispatch also served
16-bit experts (doc 17: hf's two best logits 2 bf16 steps apart); experts.py now keeps it to float32."""

import pytest
from lm_eval_tasks import generate_until, run_lm_eval, write_data, write_task

from roe import builtin_path, tasks

DOCS = [17, 27, 0, 32]  # indices into tasks.examples("math", "test", 40)
TASK = "roe_bf16_math"


def _run(task_dir, out, model, model_args):
    results, samples = run_lm_eval(task_dir, out, model, model_args, [TASK])
    return results["config"], samples[TASK]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_bf16")
    items = tasks.examples("math", "test", 40)
    write_data(d, "math", [items[i] for i in DOCS])
    write_task(d, TASK, "math", generate_until(["\n\n", "Question:"], 8))
    args = f"pretrained={builtin_path('s')}"  # no dtype: "auto" for both, the checkpoint's bfloat16
    return _run(d, d / "hf", "hf", args), _run(d, d / "roe", "roe", args + ",num_samples=1")


def test_same_model_args_load_the_checkpoints_dtype(runs):
    (hf_config, hf_text), (roe_config, roe_text) = runs
    assert hf_config["model_dtype"] == roe_config["model_dtype"] == "torch.bfloat16"
    assert roe_config["roe"]["num_samples"] == 1
    assert sorted(hf_text) == sorted(roe_text) == list(range(len(DOCS)))
    assert all(hf_text.values())


def test_k1_generates_hf_strings_in_bf16(runs):
    (_, hf_text), (_, roe_text) = runs
    assert roe_text == hf_text
