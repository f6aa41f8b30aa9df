"""What every generated task shares: splits by content hash, held-out templates, prompt formats."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SUITE_VERSION = "1"
SPLITS = ("train", "validation", "test")


def split_of(text: str) -> str:
    """The split an example belongs to, from a hash of its text: the splits can never share an example."""
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 20
    return "test" if h < 2 else "validation" if h < 4 else "train"


def qa_prompt(question: str) -> str:
    """The question-answer format that math and choice share."""
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Template:
    text: str
    held_out: bool = False  # only the test split may use it: test accuracy measures generalisation


def pick(rng: random.Random, templates: list[Template], split: str) -> Template:
    allowed = templates if split == "test" else [t for t in templates if not t.held_out]
    return rng.choice(allowed)


def generate_split(make: Callable[[random.Random, str], tuple[dict, bool]], split: str, n: int, seed: int,
                   key: Callable[[dict], str]) -> list[dict]:
    """n distinct examples of `split`. make(rng, split) -> (example, used_held_out_template).

    Train and validation hold the examples whose text hashes to them and use no
    held-out template. In test, every third example uses at least one held-out
    template (which no other split can contain); the others use seen templates
    and hash to test. Test accuracy therefore measures generalisation too.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = random.Random(f"{SUITE_VERSION}:{split}:{seed}")
    seen, out = set(), []
    for _ in range(500 * n + 1000):
        if len(out) == n:
            return out
        want_held = split == "test" and len(out) % 3 == 2
        ex, held = make(rng, "test" if want_held else "train")
        k = key(ex)
        if k in seen or held != want_held or (not held and split_of(k) != split):
            continue
        seen.add(k)
        out.append(ex)
    raise RuntimeError(f"could not generate {n} distinct {split} examples")


def stream(make: Callable[[random.Random, str], tuple[dict, bool]], seed: int, key: Callable[[dict], str]) -> Iterator[dict]:
    """An endless stream of training examples (train split only)."""
    rng = random.Random(f"{SUITE_VERSION}:stream:{seed}")
    while True:
        ex, held = make(rng, "train")
        if not held and split_of(key(ex)) == "train":
            yield ex
