"""The built-in task suite: deterministic, disjoint splits, held-out templates only in test, true answers."""

import json
import re

import pytest

from roe import tasks
from roe.evaluate import load_items
from roe.tasks import code, math


@pytest.mark.parametrize("task", ["math", "choice", "code"])
def test_splits_are_deterministic_and_disjoint(task):
    key = tasks.TASKS[task].key
    splits = {s: tasks.examples(task, s, 300) for s in tasks.SPLITS}
    assert tasks.examples(task, "test", 300) == splits["test"]
    keys = {s: {key(e) for e in v} for s, v in splits.items()}
    assert all(len(keys[s]) == 300 for s in keys)
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"] and not keys["validation"] & keys["test"]


def _pattern(template):
    return re.compile(re.sub(r"\\{\w+\\}", r"\\S+", re.escape(template.text)))


def test_held_out_templates_appear_only_in_test():
    templates = math.START + math.ADD + math.SUB + math.MUL + math.DIV + math.QUESTION
    held = [_pattern(t) for t in templates if t.held_out]

    def uses_held(e):
        return any(p.search(e["question"]) for p in held)

    for split in ("train", "validation"):
        assert not any(uses_held(e) for e in tasks.examples("math", split, 300))
    test = tasks.examples("math", "test", 300)
    assert sum(map(uses_held, test)) == 100  # every third test item


def test_math_answers_are_right():
    for ex in tasks.examples("math", "test", 200):
        value = None
        for step in ex["answer"].split("\n")[0].split(". ")[1:]:  # "a op b = c"
            lhs, rhs = step.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert value is None or int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
            assert value == int(rhs)
        assert math.final_answer(ex["answer"]) == str(value)
        assert 2 <= ex["answer"].count(" = ") <= 4


def test_choice_and_code_items():
    for ex in tasks.examples("choice", "test", 200):
        assert 3 <= len(ex["choices"]) <= 5 and 0 <= ex["answer"] < len(ex["choices"])
        assert len(set(ex["choices"])) == len(ex["choices"])
    for ex in tasks.examples("code", "test", 100):
        assert code.run(ex["program"]) == ex["output"] and ex["output"]


def test_final_answer_parsing():
    assert math.final_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert math.final_answer("#### 1,234") == "1234"
    assert math.final_answer("no answer") is None


def test_jsonl_export_round_trips_through_the_loader(tmp_path):
    paths = tasks.export_jsonl(tmp_path, n=20)
    assert len(paths) == 12
    items = load_items("math", path=str(tmp_path / "math_test.jsonl"), limit=100)
    assert items == tasks.examples("math", "test", 20)
    assert len(load_items("choice", path=str(tmp_path / "choice_validation.jsonl"))) == 20
    assert load_items("ppl", path=str(tmp_path / "ppl_test.txt"), limit=5)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "math.jsonl:2: not valid JSON"),
        (json.dumps({"question": "q"}), "math.jsonl:2: missing field 'answer'"),
        (json.dumps({"question": "q", "answer": 5}), "field 'answer' must be a str"),
        (json.dumps({"question": "q", "answer": "no final line"}), "no final '#### N' line"),
    ],
)
def test_malformed_task_file_names_line_and_field(tmp_path, line, message):
    p = tmp_path / "math.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_items("math", path=str(p))
