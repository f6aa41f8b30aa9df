"""For every supported architecture: tau = 0 (any K) and K = 1 (any tau) are exactly the base model."""

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoConfig

from roe import RoEConfig, RosterOfExperts, adapters, supported_architectures
from tiny import ARCHS, MULTIMODAL, SLIDING, VARIANTS, save_tiny_multimodal, tiny_config

PROMPTS = ["The cat sat", "2+2="]


def test_every_supported_architecture_is_tested():
    # a multimodal entry (qwen3_vl_moe) tests its language model's type too, and a text entry (aria_text) its
    # multimodal checkpoint's, whose language model RoE runs: the same registry key; MULTIMODAL: checkpoints
    # saved as shipped (llama4) and loaded as their language model
    keys = {adapters.registry_type(tiny_config(arch)) for arch in ARCHS}
    untested = {t for t in supported_architectures() if t not in ARCHS and t not in MULTIMODAL
                and adapters.registry_type(AutoConfig.for_model(t)) not in keys}
    assert not untested and set(ARCHS) <= set(supported_architectures())
    assert len(ARCHS) >= 8


def _base_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _base_logprobs(model, tok, context, continuation):
    ids = tok(context + continuation, return_tensors="pt").input_ids
    n_ctx = len(tok(context).input_ids)
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits.float(), -1)
    return float(logp[0, n_ctx - 1 : -1].gather(-1, ids[0, n_ctx:, None]).sum())


@pytest.mark.parametrize("arch", sorted(ARCHS) + sorted(SLIDING) + sorted(VARIANTS))
def test_tau_zero_and_k_one_are_the_base_model(arch, tiny_path):
    path = tiny_path(arch)
    clean = RosterOfExperts.from_pretrained(path, roe=RoEConfig(num_samples=4, tau=0.0))
    clean.eos_token_ids = set()  # compare full-length outputs
    model, tok = clean.model, clean.tokenizer
    base = [_base_greedy(model, tok, p, 12) for p in PROMPTS]
    for cache in ("clean", "full"):
        roster = clean.with_config(cache=cache)
        roster.eos_token_ids = set()
        got = [c.token_ids for c in roster.generate_completions(PROMPTS, max_new_tokens=12)]  # batched, left-padded
        assert got == base, cache
    k1 = clean.with_config(num_samples=1, tau=0.8, skip_layers=0)
    k1.eos_token_ids = set()
    assert [c.token_ids for c in k1.generate_completions(PROMPTS, max_new_tokens=12)] == base

    ctxs, conts = ["The cat", "1+1"], [" sat on", "=2"]
    expected = [_base_logprobs(model, tok, c, x) for c, x in zip(ctxs, conts)]
    for roster in (clean, clean.with_config(cache="full"), k1):
        assert roster.score(ctxs, conts) == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_noise_changes_the_prediction(arch, tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path(arch), roe=RoEConfig(num_samples=8, tau=1.0, skip_layers=0))
    ids = roster.tokenizer("The cat sat").input_ids
    run = roster.new_pass([0], record_experts=True)
    run.prefill(torch.tensor([ids[:-1]]), torch.ones(1, len(ids) - 1, dtype=torch.bool))
    logits = run.forward(torch.tensor([[ids[-1]]]))  # [1, K, 1, V]
    chosen = run.chosen[-1]  # per MoE layer: [K rows, top_k]
    distinct = [len({tuple(sorted(r)) for r in layer.tolist()}) for layer in chosen]
    assert max(distinct) > 1, "noisy rows all picked the clean experts"
    assert not torch.allclose(logits[0, 0], logits[0, 1:].mean(0)), "aggregated output equals the clean one"
    base = roster.with_config(tau=0.0)
    assert roster.score("The cat", " sat") != pytest.approx(base.score("The cat", " sat"), abs=1e-6)


@pytest.mark.parametrize("cache", ["clean", "full"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_engine_optimisations_do_not_change_results(arch, cache, tiny_path):
    """Shared leading layers, the folded clean history and the dense expert dispatch change nothing but rounding."""
    roster = RosterOfExperts.from_pretrained(tiny_path(arch),
                                             roe=RoEConfig(num_samples=4, tau=1.0, skip_layers=1, cache=cache))
    vocab = adapters.text_config(roster.model.config).vocab_size  # a multimodal model: its language model's
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :1] = False  # left padding in the batch

    def run(**options):
        p = roster.new_pass([3, 4], **options)
        p.prefill(ids[:, :-2], mask[:, :-2])
        decode = p.forward(ids[:, -2:-1])  # one position: the fused decode attention
        chunk = p.forward(torch.cat([ids[:, -1:], ids[:, :2]], 1))  # a 3-token chunk: the general attention
        return decode, chunk

    fast = run()
    for options in (dict(share_layers=False), dict(fold_samples=False), dict(choose_dispatch=False),
                    dict(share_layers=False, fold_samples=False, choose_dispatch=False)):
        for a, b in zip(fast, run(**options)):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL))
def test_a_multimodal_checkpoint_runs_its_language_model(model_type, tiny_path, tmp_path):
    """A top-level checkpoint as shipped loads as its language model: RoE runs on it, text in, exactly."""
    path = save_tiny_multimodal(model_type, tmp_path / model_type)
    roster = RosterOfExperts.from_pretrained(path, roe=RoEConfig(num_samples=4, tau=0.0))
    roster.eos_token_ids = set()
    text = RosterOfExperts.from_pretrained(tiny_path(MULTIMODAL[model_type][0]))
    assert roster.model.config.model_type == MULTIMODAL[model_type][0]
    base = [_base_greedy(text.model, text.tokenizer, p, 8) for p in PROMPTS]
    assert [c.token_ids for c in roster.generate_completions(PROMPTS, max_new_tokens=8)] == base
    noisy = roster.with_config(tau=1.0, skip_layers=0)
    assert noisy.score("The cat", " sat") != pytest.approx(roster.score("The cat", " sat"), abs=1e-6)
