"""Tiny Python programs followed by `# Output:`; the model completes the printed output.

The expected output is what the program really prints: every program is run when
it is generated, and `run` is what the scorer uses.
"""

from __future__ import annotations

import contextlib
import io
import random

from .base import Template, pick

VARS = ["a", "b", "c", "x", "y", "n", "m", "k"]
STRS = ["cat", "dog", "sun", "map", "tree", "bird", "moon", "fish", "star", "cake"]


def _arith(rng, v1, v2, split):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice(["+", "-", "*"])
    return [f"{v1} = {a}", f"{v2} = {b}", f"print({v1} {op} {v2})"], False


def _cond(rng, v1, v2, split):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    t = pick(rng, COND, split)
    return [f"{v1} = {a}", f"{v2} = {b}", *t.text.format(v1=v1, v2=v2).split("\n")], t.held_out


def _loop(rng, v1, v2, split):
    n = rng.randint(2, 6)
    start = rng.randint(0, 5)
    t = pick(rng, LOOP, split)
    return [f"{v1} = {start}", *t.text.format(v1=v1, v2=v2, n=n).split("\n")], t.held_out


def _string(rng, v1, v2, split):
    s = rng.choice(STRS)
    t = pick(rng, STRING, split)
    return [f'{v1} = "{s}"', t.text.format(v1=v1, n=rng.randint(2, 3))], t.held_out


COND = [
    Template("if {v1} > {v2}:\n    print({v1} - {v2})\nelse:\n    print({v2} - {v1})"),
    Template("if {v1} % 2 == 0:\n    print({v1} + {v2})\nelse:\n    print({v1} * 2)"),
    Template("print(max({v1}, {v2}) - min({v1}, {v2}))", held_out=True),
]
LOOP = [
    Template("for i in range({n}):\n    {v1} = {v1} + i\nprint({v1})"),
    Template("for i in range({n}):\n    {v1} = {v1} + 2\nprint({v1})"),
    Template("{v2} = 0\nwhile {v2} < {n}:\n    {v1} = {v1} + {v2}\n    {v2} = {v2} + 1\nprint({v1})", held_out=True),
]
STRING = [
    Template("print({v1}.upper())"),
    Template("print({v1}[::-1])"),
    Template("print({v1} * {n})"),
    Template("print(len({v1}))"),
    Template('print({v1} + "s")', held_out=True),
]


def run(program: str) -> str:
    """What the program prints (our own generated programs only; this is not a sandbox)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(program, "<task>", "exec"), {"__builtins__": {"print": print, "range": range, "len": len,
                                                                   "max": max, "min": min}})
    return out.getvalue().rstrip("\n")


def make(rng: random.Random, split: str) -> tuple[dict, bool]:
    v1, v2 = rng.sample(VARS, 2)
    lines, held = rng.choice([_arith, _cond, _loop, _string])(rng, v1, v2, split)
    program = "\n".join(lines) + "\n"
    return {"program": program, "output": run(program)}, held


def key(ex: dict) -> str:
    return ex["program"]


def prompt(program: str) -> str:
    return f"{program}# Output:\n"


def document(ex: dict) -> str:
    return prompt(ex["program"]) + ex["output"]
