"""Several samples of one prompt: `n` and `seeds` on generate / generate_completions / stream (issue 13, item 2)."""

import numpy as np
import pytest
from tiny import tiny_model, tiny_tokenizer

from roe import RoEConfig, RosterOfExperts

PROMPTS = ["The cat", "xyz 12"]
KW = dict(max_new_tokens=6, do_sample=True)


@pytest.fixture(scope="module")
def roster():
    cfg = RoEConfig(num_samples=4, tau=0.5, skip_layers=0, seed=7)
    return RosterOfExperts(tiny_model("olmoe"), tiny_tokenizer(), cfg, compile="off")


def alone(roster, prompt, seed, **kw):
    (text,) = roster.generate(prompt, seeds=[seed], **{**KW, **kw})
    return text


def test_default_seed_is_shared_and_n1_is_todays_behaviour(roster):
    same = roster.generate([PROMPTS[0]] * 3, **KW)
    assert same == [same[0]] * 3  # every prompt gets config.seed: same seed, same tokens
    assert same[0] == alone(roster, PROMPTS[0], 7) == roster.generate(PROMPTS[0], n=1, **KW)[0]


def test_n_draws_distinct_samples_with_seed_plus_i(roster):
    outs = roster.generate(PROMPTS, n=4, **KW)
    assert len(outs) == len(PROMPTS) * 4
    for j, prompt in enumerate(PROMPTS):
        group = outs[j * 4 : (j + 1) * 4]
        assert len(set(group)) > 1, group  # several samples, not four copies
        # completion i of a prompt with seed s is exactly that prompt alone with seed s + i (float32)
        assert group == [alone(roster, prompt, 7 + i) for i in range(4)]


def test_explicit_seeds_are_respected(roster):
    outs = roster.generate(PROMPTS, seeds=[5, 123], **KW)
    assert outs == [alone(roster, PROMPTS[0], 5), alone(roster, PROMPTS[1], 123)]
    assert roster.with_config(seed=5).generate(PROMPTS[0], **KW) == [outs[0]]
    both = roster.generate(PROMPTS, seeds=[5, 123], n=2, **KW)  # seeds: each prompt's first completion
    assert both[0::2] == outs
    assert both[1::2] == [alone(roster, PROMPTS[0], 6), alone(roster, PROMPTS[1], 124)]
    assert roster.generate(PROMPTS[0], seeds=[np.int64(5)], **KW) == [outs[0]]  # numpy integers are integers


def test_generate_completions_and_greedy_n(roster):
    comps = roster.generate_completions(PROMPTS, max_new_tokens=3, n=2)
    assert len(comps) == 4 and all(c.finish_reason in ("stop", "length") for c in comps)
    assert [c.prompt_tokens for c in comps] == [len(roster.encode_prompt(p)) for p in PROMPTS for _ in range(2)]
    # greedy: the seeds only choose the routing noise, and completion i still uses seed + i
    assert [c.text for c in comps] == [roster.generate(p, max_new_tokens=3, seeds=[7 + i])[0]
                                       for p in PROMPTS for i in range(2)]


def test_stream_n_and_seeds(roster):
    pieces = list(roster.stream(PROMPTS[0], **KW))
    assert pieces and all(isinstance(p, str) and p.index == 0 for p in pieces)
    assert "".join(pieces) == alone(roster, PROMPTS[0], 7)
    assert "".join(roster.stream(PROMPTS[0], seed=9, **KW)) == alone(roster, PROMPTS[0], 9)
    assert "".join(roster.stream(PROMPTS[0], seeds=[9], **KW)) == alone(roster, PROMPTS[0], 9)

    pieces = list(roster.stream(PROMPTS, seeds=[3, 40], n=2, **KW))
    joined = ["".join(p for p in pieces if p.index == i) for i in range(4)]
    assert joined == roster.generate(PROMPTS, seeds=[3, 40], n=2, **KW)
    assert {p.index for p in pieces} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n=0), ValueError, "n .* must be an integer >= 1"),
        (dict(n=1.5), ValueError, "n .* must be an integer >= 1"),
        (dict(n=True), ValueError, "n .* must be an integer >= 1"),
        (dict(seeds=[1, 2, 3]), ValueError, "3 seeds for 2 prompt"),
        (dict(seeds=[1]), ValueError, "1 seeds for 2 prompt"),
        (dict(seeds=[-1, 0]), ValueError, "out of range"),
        (dict(seeds=[0, 2**63]), ValueError, "out of range"),
        (dict(seeds=[0, 2**63 - 1], n=2), ValueError, "not below 2\\*\\*63"),
        (dict(seeds=[0, 1.5]), TypeError, "must be an integer"),
        (dict(seeds=[0, True]), TypeError, "must be an integer"),
        (dict(seeds=5), TypeError, "one integer per prompt"),
        (dict(seeds="12"), TypeError, "one integer per prompt"),
    ],
)
def test_bad_n_and_seeds(roster, kwargs, error, match):
    with pytest.raises(error, match=match):
        roster.generate(PROMPTS, max_new_tokens=1, **kwargs)
    with pytest.raises(error, match=match):
        roster.stream(PROMPTS, max_new_tokens=1, **kwargs)  # refused when called, before any decoding


def test_seed_range_edges_and_config_seed(roster):
    assert len(roster.generate(PROMPTS[0], max_new_tokens=1, seeds=[2**63 - 1])) == 1  # the largest valid seed runs
    with pytest.raises(ValueError, match="give seed .* or seeds .* not both"):
        roster.stream(PROMPTS[0], seed=1, seeds=[1])
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\), got -1"):
        roster.with_config(seed=-1)  # refused when the config is made, not at the first generate


def test_text_is_detokenised_per_step_only_where_needed(roster, monkeypatch):
    """generate without stop strings decodes each completion's text once, at the end, and gives the same text
    as streaming, which keeps it current after every step."""
    calls = []
    decode = roster.tokenizer.decode
    monkeypatch.setattr(roster.tokenizer, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    outs = roster.generate_completions(PROMPTS, max_new_tokens=6, do_sample=True)
    assert len(calls) == len(PROMPTS)
    assert [o.text for o in outs] == [roster.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    streamed = ["".join(roster.stream(p, max_new_tokens=6, do_sample=True)) for p in PROMPTS]
    assert streamed == [o.text for o in outs]
    calls.clear()
    stopped = roster.generate_completions(PROMPTS, max_new_tokens=6, do_sample=True, stop=["\n\n"])
    assert len(calls) >= sum(len(o.token_ids) for o in stopped)  # stop strings need the text after every token


def test_stop_strings_found_from_the_last_tokens_match_the_whole_text(roster):
    """Without streaming, stop strings are looked for in the last tokens' text; the completions (tokens, text,
    finish reason) are those of the loop that decodes the whole text after every token."""
    from roe.generate import SamplingParams, decode_steps

    ids = [roster.tokenizer(p).input_ids for p in PROMPTS * 3]
    seeds = list(range(len(ids)))
    free = roster.generate_completions(PROMPTS * 3, max_new_tokens=24, do_sample=True, seeds=seeds)
    texts = [o.text for o in free if len(o.text) > 8]
    assert texts
    stops = sorted({t[len(t) // 2 : len(t) // 2 + n] for t in texts for n in (1, 3)} - {""})  # pieces that occur

    def run(each_step):
        params = SamplingParams(24, True, stop=stops)
        *_, last = decode_steps(roster, ids, params, seeds, text_each_step=each_step)
        return [(o.token_ids, o.text, o.finish_reason) for o in last]

    windowed, whole = run(False), run(True)
    assert windowed == whole
    assert any(reason == "stop" and len(tokens) < 24 for tokens, _, reason in whole)  # the stops did cut
