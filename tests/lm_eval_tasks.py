"""lm-eval tasks over local JSONL files (no hub), and the real `lm_eval` command, for the tests that run lm-eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

from roe import tasks

CHOICE = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list: [{metric: acc}]
"""

PPL = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]
"""


def generate_until(until: list[str], max_gen_toks: int, final_answer_filter: bool = False) -> str:
    """A greedy math task; with the filter, the score reads the number after '####' (as gsm8k's tasks do)."""
    body = ('output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
            "doc_to_target: \"{{answer.split('#### ')[-1]}}\"\n"
            f"generation_kwargs: {{until: {json.dumps(until)}, max_gen_toks: {max_gen_toks}, do_sample: false}}\n")
    if final_answer_filter:
        body += ("filter_list:\n  - name: final\n"
                 '    filter: [{function: regex, regex_pattern: "#### (\\\\-?[0-9]+)"}, {function: take_first}]\n')
    return body + "metric_list: [{metric: exact_match}]\n"


def write_data(directory: Path, name: str, examples: list[dict]) -> None:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))


def write_builtin_data(directory: Path, choice: int = 0, math: int = 0, ppl: int = 0) -> None:
    """The first n test items of each built-in task as {name}.jsonl."""
    for name, n in (("choice", choice), ("math", math), ("ppl", ppl)):
        if n:
            write_data(directory, name, tasks.examples(name, "test", n))


def write_task(directory: Path, task: str, data: str, body: str) -> None:
    """{task}.yaml reading {data}.jsonl of the same folder as its test split."""
    (directory / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {directory}/{data}.jsonl}}}}\n"
        f"test_split: test\n{body}")


def run_lm_eval(task_dir: Path, out: Path, model: str, model_args: str, task_names) -> tuple[dict, dict]:
    """`lm_eval run` at batch size 4 on the CPU: its results file and, per task, its samples (doc_id -> response)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(task_names), "--include_path", str(task_dir), "--output_path", str(out),
           "--batch_size", "4", "--device", "cpu", "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = Path(out).rglob("results_*.json")
    samples = {}
    for task in task_names:
        # samples_<task>_<timestamp>.jsonl, and not those of a task whose name extends this one
        (file,) = [f for f in Path(out).rglob(f"samples_{task}_*.jsonl") if f.name[len(task) + 9].isdigit()]
        samples[task] = {row["doc_id"]: row["resps"][0][0]
                         for row in map(json.loads, file.read_text().splitlines())}
    return json.loads(path.read_text()), samples
