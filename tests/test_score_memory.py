"""Scoring memory is bounded by score_memory_bytes, whatever K (issue 13, item 3).

Allocations are counted with a TorchDispatchMode: the size of every tensor an op returns, and the bytes alive at
once of the tensors of 64 KiB or more made inside the call (a storage is alive while a tensor on it is; smaller
tensors are left out of the peak, they are noise next to a budget of tens of MiB).
"""

import weakref

import pytest
import torch
from tiny import ARCHS, COMMON, tiny_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM

from roe import RoEConfig, RosterOfExperts
from roe.score import CHUNK, SCORE_BATCH, chunk_shape, logit_width, position_bytes

K = 64
VOCAB = 20_000  # wide logits with a tiny model: the tokenizer's ids stay < 128, only the logits' width matters
ROW = K * VOCAB * 4  # the float32 logits of one position of one item: 5.1 MB
BUDGET = 4 * position_bytes(K, VOCAB, 4)  # 82 MB: 4 rows; far above the largest weight matrix (20k x 32 floats)
CONTEXTS = ["The cat sat", "A dog"]  # the tokenizer is one token per character
CONTINUATIONS = [" on a mat, again", " ran off to play"]  # 16 tokens each


class Allocations(TorchDispatchMode):
    """largest: the biggest storage of a tensor any op returned; peak: the most bytes alive at once of tensors made
    inside."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.peak = 0
        self.alive: dict[int, tuple[int, list]] = {}  # storage address -> (bytes, weak refs to its tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (_, refs) in self.alive.items() if all(r() is None for r in refs)]:
            del self.alive[key]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()  # its bytes: a view or an expand costs no more than its storage
                self.largest = max(self.largest, storage.nbytes())
                if storage.nbytes() < 1 << 16:
                    continue
                self.alive.setdefault(storage.data_ptr(), (storage.nbytes(), []))[1].append(weakref.ref(t))
        self.peak = max(self.peak, sum(n for n, _ in self.alive.values()))
        return out


@pytest.fixture(scope="module")
def model():
    cfg = AutoConfig.for_model("olmoe", **{**COMMON, **ARCHS["olmoe"], "vocab_size": VOCAB, "num_hidden_layers": 2})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def base(model):
    return RosterOfExperts(model, tiny_tokenizer(), RoEConfig(num_samples=K, tau=0.5, skip_layers=0), compile="off")


def counted(roster, pairs):
    with Allocations() as seen:
        result = roster.token_logprobs(pairs, with_greedy=True)
    return result, seen.largest, seen.peak


@pytest.fixture(scope="module")
def runs(base):
    """budget -> (token log-probs with greedy flags, largest tensor, peak live bytes) of one scoring call at K = 64."""
    pairs = [base._split(c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    return {budget: counted(base.with_config(score_memory_bytes=budget), pairs) for budget in (None, BUDGET)}


def test_weights_fit_the_budget_so_the_test_can_fail(model, runs):
    assert max(p.numel() * p.element_size() for p in model.parameters()) < BUDGET / 10
    _, largest, peak = runs[None]  # unbounded (up to 8 items x 64 positions per forward): 2 x 16 rows at once
    assert largest == 2 * 16 * ROW >= 2 * BUDGET and peak > 3 * BUDGET, (largest, peak)


def test_largest_allocation_and_peak_within_budget_at_k64(runs):
    _, largest, peak = runs[BUDGET]
    assert largest <= BUDGET, f"largest tensor {largest / 2**20:.1f} MiB over the {BUDGET / 2**20:.0f} MiB budget"
    assert peak <= BUDGET, f"peak {peak / 2**20:.1f} MiB over the {BUDGET / 2**20:.0f} MiB budget"


def same_scores(got, ref):
    assert [g for _, g in got] == [g for _, g in ref]
    for (lp, _), (want, _) in zip(got, ref):
        assert lp.shape == want.shape
        torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_floor_is_one_position_of_one_item(base):
    # a budget below K x V still runs, one item and one position per forward: the float32 logits [1, K, 1, V]
    pairs = [base._split("ab", "cde"), base._split("x", "yz")]
    got, largest, _ = counted(base.with_config(score_memory_bytes=1), pairs)
    assert largest == ROW
    same_scores(got, base.with_config(score_memory_bytes=None).token_logprobs(pairs, with_greedy=True))


def test_scores_do_not_depend_on_the_chunking(base, runs):
    ref, _, _ = runs[None]
    same_scores(runs[BUDGET][0], ref)  # 2 items x 2 positions per forward against 2 x 16
    pairs = [base._split(c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    two_rows = base.with_config(score_memory_bytes=2 * position_bytes(K, VOCAB, 4))  # 2 items x 1 position
    same_scores(two_rows.token_logprobs(pairs, with_greedy=True), ref)


def test_chunk_shape():
    assert logit_width(AutoModelForCausalLM.from_config(AutoConfig.for_model("olmoe", **{**COMMON, **ARCHS["olmoe"]}))) == (128, 4)
    assert chunk_shape(K, VOCAB, 4, None, 100) == (SCORE_BATCH, CHUNK)  # no budget: as before
    assert chunk_shape(K, VOCAB, 4, None, 3) == (3, CHUNK)
    assert chunk_shape(K, VOCAB, 4, 1, 100) == (1, 1)  # the floor
    # GPT-OSS scale: K = 64, a 201,088-token vocabulary in bf16, the default 1 GiB
    gib = 1 << 30
    items, positions = chunk_shape(64, 201_088, 2, gib, 100)
    assert items * positions * position_bytes(64, 201_088, 2) <= gib
    assert SCORE_BATCH * CHUNK * position_bytes(64, 201_088, 2) > 80 * 10**9  # what unbounded scoring would hold
    for budget in (10**6, 10**8, 10**9, 10**10):
        for n in (1, 3, 8, 50):
            items, positions = chunk_shape(8, 32_000, 2, budget, n)
            assert 1 <= items <= min(n, SCORE_BATCH) and 1 <= positions <= CHUNK
            assert items * positions * position_bytes(8, 32_000, 2) <= max(budget, position_bytes(8, 32_000, 2))


def test_budget_option(model):
    tok = tiny_tokenizer()
    cfg = RoEConfig(num_samples=2, skip_layers=0)
    roster = RosterOfExperts(model, tok, cfg, compile="off", score_memory_bytes=12345)
    assert roster.with_config(tau=0.1).score_memory_bytes == 12345  # carried over
    assert roster.with_config(score_memory_bytes=None).score_memory_bytes is None
    assert RosterOfExperts(model, tok, cfg).score_memory_bytes == 1 << 30  # the default: 1 GiB
    for bad, error in ((0, ValueError), (-5, ValueError), ("1GB", TypeError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="score_memory_bytes"):
            RosterOfExperts(model, tok, cfg, score_memory_bytes=bad)
    with pytest.raises(ValueError, match="score_memory_bytes"):
        RosterOfExperts.from_pretrained("/nonexistent/folder", score_memory_bytes=0)  # refused before loading
