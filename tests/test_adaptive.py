"""Adaptive K: per token, the K-1 noisy samples take effect only where the clean path was uncertain.

The rule (engine.py): a position's noisy samples run where the clean prediction at the previous real token
(the distribution the input token was drawn from) has entropy above / top-2 margin below the threshold; the
first token (no previous clean prediction) always runs them. Every expectation below is built independently
from a plain K = 1 run (the clean distributions, the gate) and a fixed-K run, then compared with adaptive K.
"""

import pytest
import torch

from roe import RoEConfig, RosterOfExperts
from roe.engine import pad_batch, uncertain
from roe.score import continuation_logprobs

PROMPTS = ["The cat sat", "2+2=4; 3"]
STEPS = 6
BASE = dict(num_samples=4, tau=0.8, skip_layers=1, seed=3)


@pytest.fixture(scope="module")
def path(tiny_path):
    return tiny_path("olmoe")


def _roster(path, **cfg):
    roster = RosterOfExperts.from_pretrained(path, roe=RoEConfig(**{**BASE, **cfg}))
    roster.eos_token_ids = set()
    return roster


def _forced(roster, prompts, tokens, compile=None, seeds=(3, 9), record=False):
    """Prefill, then decode the given tokens [B, STEPS] (teacher-forced, so every run sees the same inputs);
    -> the aggregated log-probs of every step [B, STEPS, V] and the pass."""
    ids = [roster.tokenizer(p).input_ids for p in prompts]
    batch, mask = pad_batch(ids, max(map(len, ids)), roster.pad_token_id, left=True)
    run = roster.new_pass(list(seeds)[: len(prompts)], capacity=batch.shape[1] + STEPS, compile=compile,
                          record_experts=record)
    run.prefill(batch[:, :-1], mask[:, :-1])
    inputs = torch.cat([batch[:, -1:], tokens[:, :-1]], dim=1)
    out = [run.decode(inputs[:, t : t + 1]) for t in range(inputs.shape[1])]
    return torch.stack(out, 1), run


def _tokens(path):
    """Tokens to feed: what the base model generates greedily (any fixed tokens would do)."""
    base = _roster(path, num_samples=1)
    tokens = torch.zeros(len(PROMPTS), STEPS, dtype=torch.long)
    out, _ = _forced(base, PROMPTS, tokens)
    for t in range(STEPS):  # greedy, one step at a time: feed the argmax of the step before
        tokens[:, t] = out[:, t].argmax(-1)
        out, _ = _forced(base, PROMPTS, tokens)
    return tokens, out  # out: the clean distributions [B, STEPS, V] at every step


def _prefill_clean(path):
    """The clean prediction at the prompt's second-to-last token (what the first decode step's gate reads)."""
    roster = _roster(path, num_samples=1)
    ids = [roster.tokenizer(p).input_ids for p in PROMPTS]
    batch, mask = pad_batch(ids, max(map(len, ids)), roster.pad_token_id, left=True)
    run = roster.new_pass([3, 9], capacity=batch.shape[1])
    run.prefill(batch[:, :-2], mask[:, :-2])
    return run.decode(batch[:, -2:-1])  # [B, V]


@pytest.fixture(scope="module")
def reference(path):
    tokens, clean = _tokens(path)
    fixed, _ = _forced(_roster(path), PROMPTS, tokens)
    before = torch.cat([_prefill_clean(path)[:, None], clean[:, :-1]], dim=1)  # [B, STEPS, V]
    return tokens, clean, fixed, before


def _entropy(logp):
    return -(logp.exp() * logp).sum(-1)


def test_skipping_every_token_is_the_base_model(path, reference):
    tokens, clean, fixed, _ = reference
    got, _ = _forced(_roster(path, adaptive_metric="entropy", adaptive_threshold=1e6), PROMPTS, tokens)
    assert not torch.allclose(fixed, clean, atol=1e-3)  # tau > 0: fixed K does differ from the base model
    torch.testing.assert_close(got, clean, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), clean.argmax(-1))
    gen = _roster(path, adaptive_metric="margin", adaptive_threshold=0.0).generate(PROMPTS, max_new_tokens=STEPS)
    assert gen == _roster(path, num_samples=1).generate(PROMPTS, max_new_tokens=STEPS)


def test_skipping_no_token_is_fixed_k(path, reference):
    tokens, _, fixed, _ = reference
    got, _ = _forced(_roster(path, adaptive_metric="margin", adaptive_threshold=1.0), PROMPTS, tokens)
    torch.testing.assert_close(got, fixed, atol=0, rtol=0)


def _midway(before):
    """A threshold between two clean entropies far apart, so rounding cannot move a token across it."""
    values = _entropy(before).flatten().sort().values
    gaps = values[1:] - values[:-1]
    middle = slice(len(values) // 4, 3 * len(values) // 4)
    i = middle.start + int(gaps[middle].argmax())
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("mode", ["batched", "alone", "compiled"])
def test_in_between_mixes_clean_and_fixed_k(path, reference, mode):
    tokens, clean, fixed, before = reference
    tau = _midway(before)
    gate = _entropy(before) > tau  # [B, STEPS]: where the noisy samples run
    assert gate.any() and not gate.all()
    want = torch.where(gate[..., None], fixed, clean)
    roster = _roster(path, adaptive_metric="entropy", adaptive_threshold=tau)
    if mode == "alone":
        got = torch.cat([_forced(roster, [p], tokens[b : b + 1], seeds=[(3, 9)[b]])[0] for b, p in enumerate(PROMPTS)])
    else:
        graphs = []

        def backend(gm, example_inputs):  # keeps the traced graphs, runs them as traced (cheap on a CPU)
            graphs.append(gm)
            return gm.forward
        if mode == "compiled":
            torch._dynamo.reset()
        got, run = _forced(roster, PROMPTS, tokens, compile=backend if mode == "compiled" else None)
        if mode == "compiled":
            assert run.compiled and len(graphs) == 1  # fullgraph: one graph, the gate read on the device
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_scoring_equals_decoding_token_by_token(path, reference):
    tokens, _, _, before = reference
    roster = _roster(path, adaptive_metric="entropy", adaptive_threshold=_midway(before))
    decoded, _ = _forced(roster, PROMPTS, tokens)
    pairs = [(roster.tokenizer(p).input_ids, tokens[b].tolist()) for b, p in enumerate(PROMPTS)]
    for positions in (STEPS, 2):  # one forward for the whole continuation, and chunks of two positions
        scored = continuation_logprobs(roster, pairs, [3, 9], positions=positions)
        for b, (lp, _) in enumerate(scored):
            torch.testing.assert_close(lp, decoded[b].gather(-1, tokens[b][:, None])[:, 0], atol=1e-5, rtol=1e-5)


def test_seeded_and_reproducible(path, reference):
    tokens, _, _, before = reference
    roster = _roster(path, adaptive_metric="entropy", adaptive_threshold=_midway(before))
    first, _ = _forced(roster, PROMPTS, tokens)
    again, _ = _forced(roster, PROMPTS, tokens)
    other, _ = _forced(roster, PROMPTS, tokens, seeds=(4, 10))
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert not torch.allclose(other, first, atol=1e-4)


def test_skipped_rows_visit_only_the_clean_experts(path, reference):
    """A skipped token's noisy rows choose the clean row's experts at every MoE layer (nothing extra to read)."""
    tokens, _, _, before = reference
    roster = _roster(path, adaptive_metric="entropy", adaptive_threshold=_midway(before))
    _, run = _forced(roster, PROMPTS, tokens, record=True)
    gate = _entropy(before) > _midway(before)
    K, B = roster.config.num_samples, len(PROMPTS)
    for t, layers in enumerate(run.chosen[1:]):  # the decode steps (the first forward is the prefill)
        for m, idx in enumerate(layers):
            rows = idx.view(B, -1, idx.shape[-1])  # [B, K or 1, top_k]
            for b in range(B):
                same = all(set(rows[b, j].tolist()) == set(rows[b, 0].tolist()) for j in range(rows.shape[1]))
                if not gate[b, t]:
                    assert same, (t, m, b)
    noisy_layer = [m for m, tau in enumerate(roster.taus) if tau > 0][0]
    assert any(len({tuple(r.tolist()) for r in layers[noisy_layer].view(B, K, -1)[b]}) > 1
               for layers, g in zip(run.chosen[1:], gate.T) for b in range(B) if g[b])  # the noise is on elsewhere


def test_rule():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert uncertain(logits, "entropy", 0.5).tolist() == [False, True]
    assert uncertain(logits, "margin", 0.1).tolist() == [False, True]
    assert uncertain(torch.tensor([[0.0, float("-inf")]]), "entropy", 0.0).tolist() == [False]  # no 0 * -inf


@pytest.mark.parametrize("fields, message", [
    (dict(adaptive_metric="entropy"), "needs a finite number adaptive_threshold"),
    (dict(adaptive_threshold=0.5), "adaptive_metric is not"),
    (dict(adaptive_metric="variance", adaptive_threshold=0.5), "adaptive_metric must be one of"),
    (dict(adaptive_metric="entropy", adaptive_threshold=-1.0), "must be >= 0"),
    (dict(adaptive_metric="margin", adaptive_threshold=1.5), "in [0, 1]"),
    (dict(adaptive_metric="margin", adaptive_threshold=float("nan")), "finite"),
    (dict(adaptive_metric="margin", adaptive_threshold=True), "finite"),
    (dict(adaptive_metric="entropy", adaptive_threshold=1.0, cache="full"), "needs cache='clean'"),
])
def test_config_errors_are_one_line(fields, message):
    with pytest.raises(ValueError) as e:
        RoEConfig(**fields)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 200


def test_profile_carries_the_setting(tmp_path):
    cfg = RoEConfig(adaptive_metric="margin", adaptive_threshold=0.25)
    (tmp_path / "p.json").write_text(__import__("json").dumps(cfg.to_dict()))
    loaded = RoEConfig.from_profile(tmp_path / "p.json")
    assert (loaded.adaptive_metric, loaded.adaptive_threshold) == ("margin", 0.25)


def test_cli_flags(capsys):
    from roe.cli import main

    prompt = ["generate", "x = 2\nprint(x + 3)\n# Output:\n", "--model", "builtin", "--tau", "0.5", "--seed", "0",
              "--max-new-tokens", "4"]
    assert main([*prompt, "-k", "1"]) == 0
    base = capsys.readouterr().out
    assert main([*prompt, "-k", "4", "--adaptive-metric", "entropy", "--adaptive-threshold", "1e6"]) == 0
    assert capsys.readouterr().out == base  # every token skipped: the base model's text
    assert main([*prompt, "--adaptive-threshold", "0.5"]) == 2
    assert "adaptive_metric is not" in capsys.readouterr().err
    assert main([*prompt, "--adaptive-metric", "off", "--adaptive-threshold", "0.5"]) == 2
    assert "drop one of them" in capsys.readouterr().err


def test_vllm_settings_take_it_with_the_engine_ranges():
    """The vLLM plugin runs adaptive K (tests/vllm/test_vllm_adaptive.py); its settings are the engine's."""
    from types import SimpleNamespace

    from roe.vllm.settings import RoESettingsError, settings_from_hf_config

    assert settings_from_hf_config(SimpleNamespace(roe={"num_samples": 4, "tau": 0.3})).adaptive_metric is None
    cfg = settings_from_hf_config(SimpleNamespace(roe={"num_samples": 4, "tau": 0.3, "adaptive_metric": "margin",
                                                       "adaptive_threshold": 0.2}))
    assert (cfg.adaptive_metric, cfg.adaptive_threshold) == ("margin", 0.2)
    with pytest.raises(RoESettingsError, match="roe: adaptive_metric must be one of"):
        settings_from_hf_config(SimpleNamespace(roe={"adaptive_metric": "x", "adaptive_threshold": 0.2}))
    with pytest.raises(RoESettingsError, match="roe: adaptive_threshold for margin"):
        settings_from_hf_config(SimpleNamespace(roe={"adaptive_metric": "margin", "adaptive_threshold": 2.0}))


def test_tune_includes_the_threshold(tmp_path):
    import json

    from roe.cli import main

    out = tmp_path / "tuned.json"
    common = ["tune", "--model", "builtin", "--task", "math", "--objective", "ppl", "-k", "2", "--val-examples", "3",
              "--seed", "0", "-o", str(out), "--trials", "3", "--tune-threshold"]
    assert main([*common, "--adaptive-metric", "margin"]) == 0
    profile = json.loads(out.read_text())
    assert profile["adaptive_metric"] == "margin" and 0 <= profile["adaptive_threshold"] <= 1
    assert RoEConfig.from_profile(out).adaptive_threshold == profile["adaptive_threshold"]
    assert main(common) == 2  # no metric to tune the threshold of


@pytest.mark.parametrize("arch", ["qwen3_next"])  # a hybrid: its chunks run one position at a time (state.py)
def test_hybrid_scoring_equals_decoding(tiny_path, arch):
    path = tiny_path(arch)
    tokens = torch.tensor([[5, 9, 13, 7, 11, 3]] * len(PROMPTS))
    clean, _ = _forced(_roster(path, num_samples=1), PROMPTS, tokens)
    threshold = float(_entropy(clean).flatten().median())  # some tokens skipped, some not
    roster = _roster(path, adaptive_metric="entropy", adaptive_threshold=threshold)
    passes = []
    original = roster.new_pass

    def new_pass(*a, **kw):  # keep the passes, to read the scoring pass's gates
        passes.append(original(*a, **kw))
        return passes[-1]
    roster.new_pass = new_pass
    decoded, _ = _forced(roster, PROMPTS, tokens)
    pairs = [(roster.tokenizer(p).input_ids, tokens[b].tolist()) for b, p in enumerate(PROMPTS)]
    scored = continuation_logprobs(roster, pairs, [3, 9], positions=STEPS)
    used = passes[-1].last_gate  # the scoring pass: the gate of every continuation position
    assert used.shape == (2, STEPS) and used.any() and not used.all()
    for b, (lp, _) in enumerate(scored):
        torch.testing.assert_close(lp, decoded[b].gather(-1, tokens[b][:, None])[:, 0], atol=1e-5, rtol=1e-5)


def test_lm_eval_model_args():
    harness = pytest.importorskip("roe.harness")
    lm = harness.RoELM(pretrained="builtin", num_samples=2, adaptive_metric="margin", adaptive_threshold="0.3")
    assert (lm.roster.config.adaptive_metric, lm.roster.config.adaptive_threshold) == ("margin", 0.3)
    with pytest.raises(ValueError, match="adaptive_threshold is set but adaptive_metric is not"):
        harness.RoELM(pretrained="builtin", adaptive_threshold="0.3")
