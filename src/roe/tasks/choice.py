"""Multiple-choice questions with 3 to 5 options: comparisons, ordering, units, counting.

Scored like the paper's commonsense tasks: the option whose text has the
highest log-probability after "Answer:" wins (options are not listed in the prompt).
"""

from __future__ import annotations

import random

from .base import Template, pick
from .base import qa_prompt as prompt
from .math import NAMES, OBJECTS

WORDS = ["apple", "river", "garden", "stone", "cloud", "tiger", "window", "lemon", "forest", "candle", "bridge",
         "rocket", "planet", "silver", "winter", "pepper", "castle", "mirror", "dragon", "pencil", "basket", "orange"]
UNITS = [("minutes", "hour", 60), ("seconds", "minute", 60), ("hours", "day", 24), ("days", "week", 7),
         ("months", "year", 12), ("centimeters", "meter", 100), ("grams", "kilogram", 1000)]

LARGEST = [Template("Which number is the largest: {opts}?"), Template("Which of {opts} is the biggest?"),
           Template("Among {opts}, which number is greatest?", held_out=True)]
SMALLEST = [Template("Which number is the smallest: {opts}?"), Template("Which of {opts} is the least?", held_out=True)]
ALPHA = [Template("Which word comes first in alphabetical order: {opts}?"),
         Template("In a dictionary, which word appears first: {opts}?", held_out=True)]
UNIT = [Template("How many {small} are in {n} {big}s?"), Template("{n} {big}s is how many {small}?", held_out=True)]
COUNT = [Template("How many letters are in the word {word}?"),
         Template("Count the letters of the word {word}.", held_out=True)]
MORE = [Template("{a} has {x} {obj} and {b} has {y} {obj}. Who has more {obj}?"),
        Template("{a} owns {x} {obj}; {b} owns {y} {obj}. Who owns more?", held_out=True)]


def _numbers(rng, k):
    return rng.sample(range(1, 100), k)


def make(rng: random.Random, split: str) -> tuple[dict, bool]:
    kind = rng.choice(["largest", "smallest", "alpha", "unit", "count", "more"])
    k = rng.randint(3, 5)
    if kind in ("largest", "smallest"):
        nums = _numbers(rng, k)
        t = pick(rng, LARGEST if kind == "largest" else SMALLEST, split)
        choices = [str(n) for n in nums]
        answer = nums.index(max(nums) if kind == "largest" else min(nums))
        q = t.text.format(opts=", ".join(choices))
    elif kind == "alpha":
        words = rng.sample(WORDS, k)
        t = pick(rng, ALPHA, split)
        choices, answer = words, words.index(min(words))
        q = t.text.format(opts=", ".join(words))
    elif kind == "unit":
        small, big, factor = rng.choice(UNITS)
        n = rng.randint(2, 9)
        right = n * factor
        wrong = {right + factor, right - factor, (n + 2) * factor, n * 10, n + factor, right * 2}
        wrong = sorted(w for w in wrong if w > 0 and w != right)
        choices = [str(x) for x in rng.sample(wrong, k - 1) + [right]]
        rng.shuffle(choices)
        t = pick(rng, UNIT, split)
        answer, q = choices.index(str(right)), t.text.format(small=small, big=big, n=n)
    elif kind == "count":
        word = rng.choice(WORDS)
        right = len(word)
        options = sorted({right - 2, right - 1, right + 1, right + 2} - {right})
        choices = [str(x) for x in rng.sample(options, k - 1) + [right]]
        rng.shuffle(choices)
        t = pick(rng, COUNT, split)
        answer, q = choices.index(str(right)), t.text.format(word=word)
    else:
        a, b, *others = rng.sample(NAMES, k)
        x, y = rng.sample(range(1, 40), 2)
        obj = rng.choice(OBJECTS)
        choices = [a, b] + others
        rng.shuffle(choices)
        t = pick(rng, MORE, split)
        answer, q = choices.index(a if x > y else b), t.text.format(a=a, b=b, x=x, y=y, obj=obj)
    return {"question": q, "choices": choices, "answer": answer}, t.held_out


def key(ex: dict) -> str:
    return ex["question"]


def document(ex: dict) -> str:
    return f"{prompt(ex['question'])} {ex['choices'][ex['answer']]}"
