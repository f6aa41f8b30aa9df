"""The static decode step: one graph without breaks, no device-to-host waits, the same numbers as eager."""

import gc
import warnings

import pytest
import torch

from roe import RoEConfig, RosterOfExperts
from roe.bench import HostWaits
from roe.engine import decode_step, pad_batch
from tiny import SLIDING

PROMPTS = ["The cat sat", "2+2=4; 3"]
STEPS = 6


def _roster(path, dtype=None, **cfg):
    roster = RosterOfExperts.from_pretrained(path, roe=RoEConfig(**{"num_samples": 4, "tau": 0.8, "skip_layers": 1,
                                                                    "seed": 3, **cfg}), dtype=dtype)
    roster.eos_token_ids = set()
    return roster


def _decode_all(roster, compile, seeds=(3, 9), prompts=PROMPTS, steps=STEPS, capacity=None):
    """Prefill the prompts, then `steps` decode steps of greedy tokens; the aggregated log-probs of every step."""
    ids = [roster.tokenizer(p).input_ids for p in prompts]
    batch, mask = pad_batch(ids, max(map(len, ids)), roster.pad_token_id, left=True)
    run = roster.new_pass(list(seeds), capacity=capacity or batch.shape[1] + steps, compile=compile)
    run.prefill(batch[:, :-1], mask[:, :-1])
    current, out = batch[:, -1:], []
    for _ in range(steps):
        out.append(run.decode(current))
        current = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out, 1), run


def _counting():
    """A torch.compile backend that keeps the graphs it is given (and runs them as traced)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return graphs, backend


# the hybrids: Gated DeltaNet + conv (qwen3_next), Mamba (jamba), Mamba-2 (granitemoehybrid), short conv (lfm2_moe),
# KDA (kimi_linear); MiniMax is below
@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe-sliding", "llama4_text",
                                  "qwen3_next", "jamba", "granitemoehybrid", "lfm2_moe", "kimi_linear", "glm_moe_dsa"])
def test_decode_step_is_one_graph_that_matches_eager(arch, tiny_path):
    """fullgraph=True raises on any graph break; a counting backend shows one graph for every step and pass."""
    roster = _roster(tiny_path(arch))
    graphs, counting_backend = _counting()
    torch._dynamo.reset()
    eager, _ = _decode_all(roster, compile=None)
    compiled, run = _decode_all(roster, compile=counting_backend)
    again, _ = _decode_all(roster, compile=counting_backend, seeds=(5, 6))  # a new pass of the same shape
    assert len(graphs) == 1  # traced once: no break, no recompilation per step or per pass
    assert run.length == run.cache.length and run.length < run.capacity
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(again, compiled)  # other seeds, other noise: the graph does not bake the noise in


def test_minimax_says_its_step_runs_eagerly_and_matches_the_uncompiled_pass(tiny_path):
    """transformers marks MiniMax `_can_compile_fullgraph = False` (its own MiniMaxCache): RoE warns, runs the step
    eagerly, and gives the same numbers as without compilation."""
    roster = _roster(tiny_path("minimax"))
    graphs, counting_backend = _counting()
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="cannot compile as one graph"):
        eager_step, run = _decode_all(roster, compile=counting_backend)
    plain, _ = _decode_all(roster, compile=None)
    assert graphs == [] and not run.compiled
    torch.testing.assert_close(eager_step, plain, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe"])
def test_16bit_step_with_transformers_expert_kernel_is_one_graph(arch, tiny_path):
    """What a GPU runs: 16-bit experts keep transformers' grouped_mm kernel (experts.py), inside the one graph."""
    roster = _roster(tiny_path(arch), dtype=torch.bfloat16)
    graphs, counting_backend = _counting()
    torch._dynamo.reset()
    eager, _ = _decode_all(roster, compile=None)
    compiled, _ = _decode_all(roster, compile=counting_backend)
    assert len(graphs) == 1 and "grouped_mm" in graphs[0].code
    # 16-bit rounding differs between the eager fused attention and the compiled step's general path. It scales with
    # the log-probs: measured up to 0.03 of their std (about 3), where 2e-2 absolute was 0.18 of the old std 0.11.
    # Rounding can also flip a near-tied top-k choice (seen: RoE's noisy choice, a margin of 4e-4), which moves a
    # (prompt, step)'s log-probs by up to ~2, and through the clean history the next steps' a little: qwen3_moe has
    # 3 of 12 beyond rounding (0.53, 0.22, 0.17, fading from step 0; also at tau = 0, so in the model's own path).
    # The same graph in float32 matches eager to 1e-5 (test_decode_step_is_one_graph_that_matches_eager).
    within_rounding = (compiled - eager).abs().amax(-1) <= 0.05 * eager.std()  # per (prompt, step)
    assert within_rounding.float().mean() >= 0.75, (compiled - eager).abs().amax(-1)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_passes_of_one_shape_reuse_the_buffers_of_finished_ones(tiny_path):
    """What CUDA graphs need (fixed addresses across calls), checked on the CPU: a finished pass's buffers are
    reused, after a reset, by the next pass of the same shape, and the results are those of fresh buffers."""
    roster = _roster(tiny_path("olmoe"))
    first, run = _decode_all(roster, compile="eager")
    address = run.cache.keys[0].data_ptr()
    del run
    gc.collect()  # a pass in a reference cycle is freed by the collector
    second, run = _decode_all(roster, compile="eager")
    assert run.cache.keys[0].data_ptr() == address
    fresh, _ = _decode_all(roster, compile=None)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    torch.testing.assert_close(second, fresh, atol=1e-5, rtol=1e-5)


def test_the_compiled_step_grows_past_its_capacity_eagerly(tiny_path):
    roster = _roster(tiny_path("olmoe"))
    ids = torch.tensor([roster.tokenizer("abc").input_ids])
    run = roster.new_pass([0], capacity=4, compile="eager")
    run.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool))
    reference = roster.new_pass([0], capacity=512)
    reference.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1], dtype=torch.bool))
    current = ids[:, -1:]
    capacity = run.capacity
    for _ in range(capacity + 3):  # past the first capacity: the buffers grow, the results do not change
        got, want = run.decode(current), reference.decode(current)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        current = got.argmax(-1, keepdim=True)
    assert run.capacity > capacity


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "gpt_oss", "qwen3_next", "jamba", "granitemoehybrid",
                                  "lfm2_moe", "kimi_linear", "minimax", "glm_moe_dsa"])
def test_decode_step_never_waits_for_the_device(arch, tiny_path):
    roster = _roster(tiny_path(arch))
    ids = [roster.tokenizer(p).input_ids for p in PROMPTS]
    batch, mask = pad_batch(ids, max(map(len, ids)), roster.pad_token_id, left=True)
    run = roster.new_pass([1, 2], capacity=batch.shape[1] + 4)
    run.prefill(batch[:, :-1], mask[:, :-1])
    step = run._step(run.k, run.next_pos, run.slot, run.valid)
    alive = torch.tensor([True, False])
    with HostWaits() as mode:
        run._call(step, decode_step, run, batch[:, -1:].contiguous(), alive)  # the body torch.compile traces
    assert "mm" in mode.ops or "bmm" in mode.ops or "matmul" in mode.ops or "addmm" in mode.ops  # it did run
    assert mode.waits == []


def test_sync_detector_catches_a_scalar_read(tiny_path):
    """The detector above is not blind: the eager generation loop's .item()-style reads are caught."""
    with HostWaits() as mode:
        torch.ones(3).sum().item()
        torch.tensor([0, 1, 1]).nonzero()
    assert mode.waits == ["_local_scalar_dense", "nonzero"]



def test_a_compiled_pass_rounds_its_batch_up_and_returns_only_the_callers_rows(tiny_path):
    roster = _roster(tiny_path("olmoe"))
    prompts = ["The cat sat", "2+2=4; 3", "once upon"]
    graphs, backend = _counting()
    torch._dynamo.reset()
    compiled, run = _decode_all(roster, backend, [0, 1, 2], prompts, 4, capacity=20)
    eager, _ = _decode_all(roster, None, [0, 1, 2], prompts, 4, capacity=20)
    assert run.seeds.shape[0] == 4 and run.capacity == 128 and compiled.shape[0] == 3
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    alone, _ = _decode_all(roster, backend, [2], prompts[2:], 4, capacity=20)  # a shape of its own
    torch.testing.assert_close(alone[0], eager[2], atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2


def test_more_shapes_than_torch_compiles_default_limit(tiny_path):
    """torch.compile keeps 8 graphs per function by default and, with fullgraph=True, raises on the ninth:
    a server sees many batch sizes and lengths. Nine shapes here, all compiled, none an error."""
    roster = _roster(tiny_path("olmoe"))
    graphs, backend = _counting()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (1, 2, 4):
            for capacity in (100, 200, 300):  # buckets of 128, 256 and 512 slots
                _decode_all(roster, backend, range(n), PROMPTS[:1] * n, 2, capacity)
    assert len(graphs) == 9


def test_a_step_that_cannot_compile_runs_eagerly_with_a_warning(tiny_path, monkeypatch):
    import roe.engine as engine

    roster = _roster(tiny_path("olmoe"))
    graphs, backend = _counting()
    torch._dynamo.reset()
    monkeypatch.setattr(engine, "COMPILED_SHAPES", 1)
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would delete the option when undoing)
        _decode_all(roster, backend, [0], PROMPTS[:1], 2, capacity=10)
        with pytest.warns(UserWarning, match="could not build the decode step.*decodes eagerly"):
            got, run = _decode_all(roster, backend, [0, 1], PROMPTS, 3, capacity=10)  # a second shape: over the limit
    assert run.compile is None and len(graphs) == 1
    want, _ = _decode_all(roster, None, [0, 1], PROMPTS, 3, capacity=10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_that_cannot_be_one_graph_decodes_eagerly_with_a_warning(tiny_path):
    """JetMoE (like DBRX and LongCat-Flash) says `_can_compile_fullgraph = False`: no tracing is tried."""
    roster = _roster(tiny_path("jetmoe"))
    graphs, backend = _counting()
    with pytest.warns(UserWarning, match="cannot compile as one graph"):
        got, run = _decode_all(roster, backend, steps=3)
    assert run.compile is None and not graphs
    want, _ = _decode_all(roster, None, steps=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_scoring_passes_never_take_the_compiled_shape(tiny_path, monkeypatch):
    """Scoring runs chunks eagerly: with compilation on, its passes keep the caller's batch (no idle rows, which
    would also overrun the scoring memory budget) and reserve their length at once."""
    roster = _roster(tiny_path("olmoe")).with_config(compile="on")
    made, new_pass = [], roster.new_pass
    monkeypatch.setattr(roster, "new_pass", lambda *a, **k: made.append(new_pass(*a, **k)) or made[-1])
    contexts, continuations = ["The cat sat", "2+2=4; 3", "once upon"], [" on", " =", " a time"]
    scores = roster.score(contexts, continuations)
    assert made and all(not run.compiled and run.seeds.shape[0] == run.batch for run in made)
    assert scores == roster.with_config(compile="off").score(contexts, continuations)


def test_inductor_compiled_generation_draws_the_same_tokens_as_eager(tiny_path):
    """`compile="on"` (inductor's C++ on this CPU, whatever its vector width) and `compile="off"` generate the
    same tokens for the same seeds with noise on: the compiled step computes the routing noise bit for bit."""
    roster = _roster(tiny_path("olmoe"))
    prompts, seeds = PROMPTS, [3, 4]
    torch._dynamo.reset()
    compiled = roster.with_config(compile="on").generate_completions(prompts, max_new_tokens=STEPS, seeds=seeds)
    eager = roster.with_config(compile="off").generate_completions(prompts, max_new_tokens=STEPS, seeds=seeds)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    noisy, _ = _decode_all(roster, None)
    clean, _ = _decode_all(roster.with_config(tau=0.0), None)
    assert not torch.allclose(noisy, clean, atol=1e-3)  # the noise is on, and changes the predictions
