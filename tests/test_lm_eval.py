"""The real `lm_eval` command with `--model roe`, on a local YAML task over local JSONL files (no hub).

K = 1 must give lm-eval's own `hf` model's numbers on the same checkpoint with the same model_args, for all three
request types, and generate exactly the strings `hf` generates (float32 here; 16-bit: test_lm_eval_bf16.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roe import builtin_path, tasks

TASKS = {
    "roe_local_choice": """
dataset_kwargs: {{data_files: {{test: {dir}/choice.jsonl}}}}
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list: [{{metric: acc}}]
""",
    "roe_local_math": """
dataset_kwargs: {{data_files: {{test: {dir}/math.jsonl}}}}
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs: {{until: ["\\n\\n", "Question:"], max_gen_toks: 64, do_sample: false}}
filter_list:
  - name: final
    filter: [{{function: regex, regex_pattern: "#### (\\\\-?[0-9]+)"}}, {{function: take_first}}]
metric_list: [{{metric: exact_match}}]
""",
    "roe_local_math_short": """
dataset_kwargs: {{data_files: {{test: {dir}/math.jsonl}}}}
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\nAnswer:"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
    "roe_local_ppl": """
dataset_kwargs: {{data_files: {{test: {dir}/ppl.jsonl}}}}
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, body in [("choice", tasks.examples("choice", "test", 12)), ("math", tasks.examples("math", "test", 6)),
                       ("ppl", tasks.examples("ppl", "test", 4))]:
        (d / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in body))
    for task, spec in TASKS.items():
        header = f"task: {task}\ndataset_path: json\ntest_split: test\n"
        (d / f"{task}.yaml").write_text(header + spec.format(dir=d))
    return d


def _lm_eval(task_dir, out, model, model_args):
    """lm-eval's results and, per generate_until task, the generated string of each document."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(TASKS), "--include_path", str(task_dir), "--output_path", str(out),
           "--batch_size", "4", "--device", "cpu", "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = Path(out).rglob("results_*.json")
    generated = {}
    for task in ("roe_local_math", "roe_local_math_short"):
        (samples,) = [f for f in Path(out).rglob(f"samples_{task}_*.jsonl") if f.name[len(task) + 9].isdigit()]
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        generated[task] = {row["doc_id"]: row["resps"][0][0] for row in rows}
    return json.loads(path.read_text())["results"], generated


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
