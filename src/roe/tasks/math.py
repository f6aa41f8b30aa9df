"""GSM8K-format word problems: 2 to 4 arithmetic steps on two- and three-digit numbers, a short worked
solution, a final `#### N`."""

from __future__ import annotations

import random
import re

from .base import Template, pick
from .base import qa_prompt as prompt

NAMES = ["Tom", "Ann", "Sara", "Ben", "Lily", "Omar", "Maya", "Leo", "Nina", "Sam", "Ivy", "Max", "Zoe", "Eli",
         "Ada", "Raj", "Mia", "Kai", "Eva", "Noah"]
OBJECTS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "cookies", "shells", "cards", "eggs",
           "flowers", "stamps", "toys", "beads", "candies", "oranges"]

START = [
    Template("{name} has {a} {obj}."),
    Template("{name} starts with {a} {obj}."),
    Template("There are {a} {obj} in {name}'s bag."),
    Template("{name} owns {a} {obj}.", held_out=True),
]
ADD = [
    Template("{pron} buys {b} more."),
    Template("{pron} finds {b} more."),
    Template("A friend gives {obj_pron} {b} more."),
    Template("{pron} gets {b} more {obj}.", held_out=True),
]
SUB = [
    Template("{pron} gives away {b}."),
    Template("{pron} loses {b}."),
    Template("{pron} uses {b} of them."),
    Template("{pron} sells {b} of them.", held_out=True),
]
MUL = [
    Template("{pron} doubles the amount.", held_out=False),
    Template("Then the number of {obj} becomes {b} times as large."),
    Template("{pron} ends up with {b} times as many."),
    Template("The pile grows to {b} times its size.", held_out=True),
]
DIV = [
    Template("{pron} shares them equally among {b} friends, and keeps one share."),
    Template("{pron} splits them into {b} equal groups and keeps one group."),
    Template("{pron} puts them into {b} equal boxes and keeps one box.", held_out=True),
]
QUESTION = [
    Template("How many {obj} does {name} have now?"),
    Template("How many {obj} are left with {name}?"),
    Template("What is the number of {obj} {name} has at the end?", held_out=True),
]


def make(rng: random.Random, split: str) -> tuple[dict, bool]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    pron = "She" if name in {"Ann", "Sara", "Lily", "Maya", "Nina", "Ivy", "Zoe", "Ada", "Mia", "Eva"} else "He"
    obj_pron = "her" if pron == "She" else "him"
    fill = dict(name=name, obj=obj, pron=pron, obj_pron=obj_pron)
    value = rng.randint(10, 99)
    held = False
    t = pick(rng, START, split)
    held |= t.held_out
    question = [t.text.format(a=value, **fill)]
    solution = [f"{name} starts with {value}."]
    for _ in range(rng.randint(2, 4)):
        divisors = [d for d in range(2, 10) if value % d == 0]
        ops = ["add"] * (value < 500) + ["sub"] * (value > 2) + ["mul"] * (value < 150) + ["div"] * bool(divisors)
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(10, 99)
            t, new, expr = pick(rng, ADD, split), value + b, f"{value} + {b}"
        elif op == "sub":
            b = rng.randint(1, value - 1)
            t, new, expr = pick(rng, SUB, split), value - b, f"{value} - {b}"
        elif op == "mul":
            t = pick(rng, MUL, split)
            b = 2 if "doubles" in t.text else rng.randint(2, 9)
            new, expr = value * b, f"{value} * {b}"
        else:
            b = rng.choice(divisors)
            t, new, expr = pick(rng, DIV, split), value // b, f"{value} / {b}"
        held |= t.held_out
        question.append(t.text.format(b=b, **fill))
        solution.append(f"{expr} = {new}.")
        value = new
    t = pick(rng, QUESTION, split)
    held |= t.held_out
    question.append(t.text.format(**fill))
    answer = " ".join(solution) + f"\n#### {value}"
    return {"question": " ".join(question), "answer": answer}, held


def key(ex: dict) -> str:
    return ex["question"]


def document(ex: dict) -> str:
    return f"{prompt(ex['question'])} {ex['answer']}"


_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after `####` (GSM8K convention), commas removed; None if there is none."""
    m = _FINAL.search(text)
    return m.group(1).replace(",", "") if m else None
