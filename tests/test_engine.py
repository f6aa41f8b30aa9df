"""The batched engine against a slow, obviously-correct reference; memory; reproducibility; streaming; stops."""

import copy

import pytest
import torch
from transformers import DynamicCache

from roe import RoEConfig, RosterOfExperts
from roe.adapters import ACTIVE, RoutingNoise, cache_kwargs
from roe.engine import aggregate
from roe.routing import python_gumbel
from tiny import SLIDING, VARIANTS

K, TAU, SEED = 4, 0.8, 5


def _noise(roster, sample, g_pos):
    """Per-layer noise for one sample: g_pos [S, K-1, L, E] -> list of [S, E] (None on clean layers)."""
    out = []
    for m, tau in enumerate(roster.taus):
        if sample == 0 or tau == 0:
            out.append(None)
        else:
            out.append(g_pos[:, sample - 1, m, : roster.num_experts[m]] * tau)
    return out


def _forward_with_noise(model, per_layer, rows, **kw):
    token = ACTIVE.set(RoutingNoise(per_layer, torch.ones(rows, 1, dtype=torch.bool)))
    try:
        with torch.no_grad():
            return model(**kw).logits[0, -1]
    finally:
        ACTIVE.reset(token)


def reference_next_logprobs(roster, tokens, cache):
    """Next-token log-probs after `tokens`, one sample at a time, with explicit caches and no batching."""
    model, n = roster.model, len(tokens)
    L, E = len(roster.taus), max(roster.num_experts)  # the noise from its plain-Python reference: [n, K-1, L, E]
    g = torch.tensor([[[[python_gumbel(SEED, p, k, m, e) for e in range(E)] for m in range(L)] for k in range(1, K)]
                      for p in range(n)])
    ids = torch.tensor([tokens])
    if cache == "clean":
        history = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :-1], **cache_kwargs(model, history), use_cache=True)
    logits = []
    for k in range(K):
        if cache == "clean":  # the clean history, copied; noise only on the current token
            kw = dict(input_ids=ids[:, -1:], **cache_kwargs(model, copy.deepcopy(history)),
                      position_ids=torch.tensor([[n - 1]]))
            per_layer = _noise(roster, k, g[-1:])
            logits.append(_forward_with_noise(model, per_layer, 1, **kw))
        else:  # the whole sequence recomputed with this sample's noise everywhere
            per_layer = _noise(roster, k, g)
            logits.append(_forward_with_noise(model, per_layer, n, input_ids=ids))
    return aggregate(torch.stack(logits)[None], roster.config.aggregate)[0]


# arch-b: llama4_text (chunked local attention, NoPE layers), jetmoe (attention heads tiled over its attention
# experts), longcat_flash (two attention blocks per decoder layer, zero-computation experts)
ARCH_B = ["llama4_text", "jetmoe", "longcat_flash"]


# glm_moe_dsa: sparse attention, its indexer choosing 4 keys, fewer than the sequences hold (-all-keys: all; deepseek_v32
# runs the same code: the same indexer, without shared layers); hy_v4: sparse attention with sinks, hyper-connections
# afmoe: gated attention, NoPE
@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3", "deepseek_v2", "glm_moe_dsa", "hy_v4", "afmoe",
                                  *VARIANTS, *SLIDING, *ARCH_B])
@pytest.mark.parametrize("cache", ["clean", "full"])
@pytest.mark.parametrize("skip", [0, 1])  # skip 1: clean leading layers, computed once per prompt
def test_batched_engine_matches_reference(arch, cache, skip, tiny_path):
    roster = RosterOfExperts.from_pretrained(
        tiny_path(arch), roe=RoEConfig(num_samples=K, tau=TAU, skip_layers=skip, cache=cache, seed=SEED)
    )
    roster.eos_token_ids = set()
    prompts = ["The cat sat", "2+2=4; 3+3"]  # different lengths: left padding in the batch
    got = roster.generate_completions(prompts, max_new_tokens=8)
    for prompt, completion in zip(prompts, got):
        tokens = roster.tokenizer(prompt).input_ids
        steps = []
        for _ in range(8):  # the reference's own greedy loop
            lp = reference_next_logprobs(roster, tokens, cache)
            steps.append(lp)
            tokens = tokens + [int(lp.argmax())]
        assert completion.token_ids == tokens[-8:]
        # scoring the generated continuation gives the log-probs the loop saw
        ctx = roster.tokenizer(prompt).input_ids
        (scored,) = roster.token_logprobs([(ctx, completion.token_ids)])
        expected = torch.stack([s[t] for s, t in zip(steps, completion.token_ids)])
        torch.testing.assert_close(scored, expected, atol=1e-4, rtol=1e-4)


def test_clean_cache_does_not_grow_with_k(tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(tau=0.5))
    ids = torch.tensor([roster.tokenizer("hello there").input_ids])
    sizes = {}
    for cache in ("clean", "full"):
        for k in (1, 32):
            run = roster.with_config(num_samples=k, cache=cache).new_pass([0])
            run.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool))
            for _ in range(5):
                run.forward(ids[:, -1:])
            sizes[cache, k] = run.kv_cache_bytes()
    assert sizes["clean", 1] > 0
    assert sizes["clean", 32] == sizes["clean", 1]
    # the full cache keeps one history per sample from the first noisy layer on, one per prompt before it
    layers, shared = roster.model.config.num_hidden_layers, run.fanout
    assert shared == 1
    assert sizes["full", 32] == sizes["full", 1] // layers * (shared + 32 * (layers - shared))


def test_same_seed_same_tokens(tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=4, tau=1.0, skip_layers=0, seed=1))
    roster.eos_token_ids = set()
    a = roster.generate("The cat", max_new_tokens=16, do_sample=True, temperature=1.5)
    assert roster.generate("The cat", max_new_tokens=16, do_sample=True, temperature=1.5) == a
    others = [roster.with_config(seed=s).generate("The cat", max_new_tokens=16, do_sample=True, temperature=1.5)
              for s in range(2, 6)]
    assert any(o != a for o in others)
    # a prompt's tokens do not depend on the other prompts in its batch
    batched = roster.generate(["The cat", "x"], max_new_tokens=16, do_sample=True, temperature=1.5)
    assert batched[0] == a[0]


def test_stream_and_stop_strings(tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path("mixtral"), roe=RoEConfig(num_samples=3, tau=0.5))
    roster.eos_token_ids = set()
    full = roster.generate("Hello", max_new_tokens=20)[0]
    pieces = list(roster.stream("Hello", max_new_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == full
    stop = full[5:7]
    cut = full[: full.find(stop)]
    assert roster.generate("Hello", max_new_tokens=20, stop=[stop])[0] == cut
    assert "".join(roster.stream("Hello", max_new_tokens=20, stop=stop)) == cut
    (done,) = roster.generate_completions("Hello", max_new_tokens=20, stop=stop)
    assert done.finish_reason == "stop"
    (long,) = roster.generate_completions("Hello", max_new_tokens=4)
    assert long.finish_reason == "length" and len(long.token_ids) == 4


def test_eos_ends_generation(tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=2, tau=0.0))
    roster.eos_token_ids = set()
    (free,) = roster.generate_completions("The cat", max_new_tokens=10)
    roster.eos_token_ids = {free.token_ids[3]}
    (stopped,) = roster.generate_completions("The cat", max_new_tokens=10)
    first = free.token_ids.index(free.token_ids[3])
    assert stopped.token_ids == free.token_ids[:first] and stopped.finish_reason == "stop"


def test_sampling_follows_the_aggregated_distribution(tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=1, tau=0.0))
    roster.eos_token_ids = set()
    texts = {roster.with_config(seed=s).generate("ab", max_new_tokens=1, do_sample=True)[0] for s in range(40)}
    assert len(texts) > 3  # a random tiny model is uncertain: sampling explores
    narrow = {roster.with_config(seed=s).generate("ab", max_new_tokens=1, do_sample=True, top_p=1e-6)[0] for s in range(10)}
    assert narrow == {roster.generate("ab", max_new_tokens=1)[0]}  # top_p -> 0 is greedy


def test_unwrap_leaves_the_model_bit_identical(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path("qwen2_moe"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
    roster = RosterOfExperts(model, RosterOfExperts.from_pretrained(tiny_path("qwen2_moe")).tokenizer,
                             RoEConfig(num_samples=4, tau=0.9, skip_layers=0))
    roster.generate("abc", max_new_tokens=3)
    with torch.no_grad():
        during = model(ids).logits  # hooks installed but idle outside a RoE pass
    assert roster.unwrap() is model
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    assert roster.score("ab", "cd") != roster.with_config(tau=0.0).score("ab", "cd")  # re-hooks on use


def test_leading_clean_layers_run_once_per_prompt(tiny_path):
    roster = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(num_samples=8, tau=0.5, skip_layers=1))
    layers = roster.model.model.layers
    rows = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: rows.__setitem__(i, out.shape[0]))
             for i, layer in enumerate(layers)]
    try:
        for config, expected in ((roster.config, [2, 16, 16, 16]),  # layer 0 is clean: shared by the 8 samples
                                 (roster.config.replace(tau=0.0), [2, 2, 2, 2]),  # samples never separate
                                 (roster.config.replace(cache="full"), [2, 16, 16, 16]),  # own histories from layer 1
                                 (roster.config.replace(cache="full", tau=0.0), [2, 2, 2, 2])):
            run = roster.with_config(**config.to_dict()).new_pass([0, 1])
            run.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
            logits = run.forward(torch.tensor([[9], [10]]))
            assert logits.shape[:3] == (2, 8, 1)
            assert [rows[i] for i in range(len(layers))] == expected
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss", "deepseek_v3", "granitemoe", "qwen2_moe"])
def test_dense_expert_dispatch_matches_transformers(arch, tiny_path):
    from transformers.integrations.moe import grouped_mm_experts_forward

    from roe.adapters import find_experts
    from roe.experts import dense_experts_forward, prefers_dense

    model = RosterOfExperts.from_pretrained(tiny_path(arch)).unwrap()
    experts = find_experts(model)[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, model.config.hidden_size, generator=g)
    weights, index = torch.softmax(torch.randn(6, experts.num_experts, generator=g), -1).topk(2, -1)
    torch.testing.assert_close(dense_experts_forward(experts, hidden, index, weights),
                               grouped_mm_experts_forward(experts, hidden, index, weights), atol=1e-5, rtol=1e-4)
    assert prefers_dense(experts, 6)  # tiny experts on a CPU


@pytest.mark.parametrize("cache", ["clean", "full"])
def test_decode_step_dispatches_the_same_operations_for_every_k(cache, tiny_path):
    """K samples are rows of one batch, not a loop: the operations one step dispatches do not grow with K."""
    from roe.bench import kernels_per_token

    roster = RosterOfExperts.from_pretrained(tiny_path("olmoe"), roe=RoEConfig(tau=0.5, skip_layers=1, cache=cache))
    prompt = torch.randint(3, roster.model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    counts = {k: kernels_per_token(roster.with_config(num_samples=k), prompt, "roe") for k in (2, 8, 32)}
    assert counts[2] == counts[8] == counts[32] > kernels_per_token(roster, prompt, "base") // 2


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "deepseek_v32"])
def test_sparse_attention_references_agree(arch, tiny_path):
    """The references above use both of transformers' paths through a sparse-attention indexer: the clean cache's
    a cached history plus one token, the full cache's the whole sequence at once. With index_topk (4) below the
    sequence they could disagree (on real checkpoints, an indexer's exact ties at 0, its ReLU'd scores, fall to
    topk's tie-breaking, which depends on the shape); on these checkpoints they agree, so either is the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path(arch)).eval()
    assert model.config.index_topk < 16
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[0]
        cache = DynamicCache(config=model.config)
        model(ids[:, :4], **cache_kwargs(model, cache), use_cache=True)
        steps = torch.stack([model(ids[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                             for i in range(4, 16)])
    torch.testing.assert_close(steps, full[4:], atol=1e-4, rtol=1e-4)
    # the indexer's choice matters: reading every key gives other logits
    model.config.index_topk = 64
    for layer in model.model.layers:
        if getattr(layer.self_attn, "indexer", None) is not None:
            layer.self_attn.indexer.index_topk = 64
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, 4:], full[4:], atol=1e-2)
