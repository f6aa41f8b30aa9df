"""`--model roe` against lm-eval's `hf` on a 16-bit checkpoint, through the real `lm_eval` command.

The same model_args load the same dtype (`dtype=auto`: the checkpoint's bfloat16 for both), and with K = 1 `roe`
should generate exactly the strings `hf` generates. The four documents are one batch (of 4) of the first 40
built-in math test items, the batch in which the strings differed while RoE's dense expert dispatch also served
16-bit experts (doc 17: hf's two best logits 2 bf16 steps apart); experts.py now keeps it to float32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roe import builtin_path, tasks

DOCS = [17, 27, 0, 32]  # indices into tasks.examples("math", "test", 40)
TASK = """task: roe_bf16_math
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/math.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs: {{until: ["\\n\\n", "Question:"], max_gen_toks: 8, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


def _run(task_dir, out, model, model_args):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", model, "--model_args", model_args,
           "--tasks", "roe_bf16_math", "--include_path", str(task_dir), "--output_path", str(out),
           "--batch_size", "4", "--device", "cpu", "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = Path(out).rglob("results_*.json")
    (samples,) = Path(out).rglob("samples_roe_bf16_math_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text())["config"], {r["doc_id"]: r["resps"][0][0] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_bf16")
    items = tasks.examples("math", "test", 40)
    (d / "math.jsonl").write_text("".join(json.dumps(items[i]) + "\n" for i in DOCS))
    (d / "roe_bf16_math.yaml").write_text(TASK.format(dir=d))
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
