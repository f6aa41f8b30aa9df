"""A K (with the batch and length) whose step cannot fit in memory is refused before anything is allocated,
with the estimate in bytes and what to change; one that fits runs."""

import re

import pytest

from roe import RoEConfig, RosterOfExperts, memory, roster as roster_module
from roe.cli import main


@pytest.fixture(scope="module")
def roster(tiny_path):
    return RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=2, tau=0.3))


def _no_pass(monkeypatch):
    monkeypatch.setattr(roster_module, "RoEPass", lambda *a, **k: pytest.fail("the pass was allocated"))


@pytest.mark.parametrize("call", ["generate", "score", "perplexity"])
def test_a_billion_samples_are_refused_up_front(roster, monkeypatch, call):
    _no_pass(monkeypatch)
    big = roster.with_config(num_samples=10**9)
    run = {"generate": lambda: big.generate("abc", max_new_tokens=2), "score": lambda: big.score("ab", " c"),
           "perplexity": lambda: big.perplexity("abcdef")}[call]
    with pytest.raises(ValueError, match=r"K = 1000000000 needs about \S+ bytes per step .* lower K") as info:
        run()
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_the_limit_is_the_free_memory(roster, monkeypatch):
    terms = memory.step_terms(roster.model, 3, 64, 1, 40, False, len(roster.routers))
    need = sum(terms.values())
    assert terms["logits"] == 3 * 64 * roster.model.config.vocab_size * (4 + 4 * 3)  # float32 logits + 3 copies
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    monkeypatch.setattr(memory, "MIN_CHECKED", 0)
    with pytest.raises(ValueError, match=re.escape(f"3 prompt(s) x K = 64 needs about {need:.3g} bytes per step")):
        memory.check_step_fits(roster.model, 3, 64, 1, 40, False, len(roster.routers))
    monkeypatch.setattr(memory, "free_bytes", lambda device: need)
    memory.check_step_fits(roster.model, 3, 64, 1, 40, False, len(roster.routers))  # exactly fits: no error


def test_the_full_cache_counts_k_histories(roster):
    clean = memory.step_terms(roster.model, 2, 8, 1, 100, False, 4)
    full = memory.step_terms(roster.model, 2, 8, 1, 100, True, 4)
    cfg = roster.model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    assert full["full cache"] == 2 * 8 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head * 100 * 4
    assert "full cache" not in clean


def test_a_small_step_is_never_refused(roster, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)  # under MIN_CHECKED the system is not asked
    assert len(roster.with_config(num_samples=200).generate("abc", max_new_tokens=2)) == 1


def test_cli_exits_2(capsys):
    assert main(["generate", "hi", "--model", "builtin", "-k", "1000000000", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 prompt(s) x K = 1000000000 needs about") and "\n" not in err
