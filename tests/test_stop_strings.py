"""Stop strings in a growing text (roe.generate.StopMatcher): the same cut and hold-back as searching the whole text
every step, at a cost per step that does not grow with the stop strings' length."""

import random
import time

from roe.generate import StopMatcher, _cut_at_stop, _held_back


def test_matcher_agrees_with_searching_the_whole_text():
    rng = random.Random(0)
    for trial in range(400):
        stops = ["".join(rng.choice("aab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        matcher, text = StopMatcher(stops), ""
        for _ in range(40):
            text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))  # 0-3 new characters a step
            cut = matcher.feed(text)
            expected, stopped = _cut_at_stop(text, stops)
            assert (cut is not None) == stopped and (cut is None or text[:cut] == expected), (stops, text)
            if stopped:
                break
            assert matcher.held(text) == _held_back(text, stops), (stops, text)


def test_unfinished_characters_are_held_and_rewritten_text_is_rescanned():
    m = StopMatcher(["ab\u00e9"])
    assert m.feed("xab\ufffd") is None and m.held("xab\ufffd") == 3  # "ab" could still start the stop, and the U+FFFD
    assert m.feed("xab\u00e9") == 1  # the tokens after it finished the character: the stop is there
    m = StopMatcher(["cd"])
    assert m.feed("abc") is None and m.held("abc") == 1
    assert m.feed("a cd") == 2  # the earlier text changed (a tokenizer's clean-up): scanned again from the start


def _cost(stops, chars=2000, repeats=3) -> float:
    """Seconds per step of a 1-character-a-step text of `chars` characters that never matches."""
    text = "".join(random.Random(1).choice("ab") for _ in range(chars))
    best = float("inf")
    for _ in range(repeats):
        m = StopMatcher(stops)
        t = time.perf_counter()
        for i in range(1, chars + 1):
            assert m.feed(text[:i]) is None
            m.held(text[:i])
        best = min(best, time.perf_counter() - t)
    return best / chars


def test_cost_per_step_does_not_grow_with_stop_length():
    """16 stops of 4,000 characters cost what 16 of 4 do (searching the whole text each step cost 6,618 times as
    much in the audit): both feed one character a step through 16 automata."""
    long = ["ab" * 1999 + "c" + str(i) for i in range(16)]  # long partial matches all along the text
    short = ["abc" + str(i) for i in range(16)]
    ratio = _cost(long) / _cost(short)
    assert ratio < 4, f"a step with 4,000-character stops cost {ratio:.1f} times one with 4-character stops"
