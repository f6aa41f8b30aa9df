"""RosterOfExperts: a Hugging Face MoE model plus a RoEConfig, with generate / stream / score / perplexity."""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Iterator, Sequence

import torch

from . import adapters, loading
from .config import RoEConfig
from .engine import RoEPass
from .memory import check_step_fits
from .generate import Completion, SamplingParams, decode_steps, new_text
from .routing import SEED_RANGE, layer_taus
from .score import SCORE_BATCH  # noqa: F401  (re-exported: it lived here before)
from .score import DEFAULT_SCORE_MEMORY, check_budget, chunk_shape, continuation_logprobs, logit_width

COMPILE_MODES = ("auto", "on", "off")


class StreamPiece(str):
    """A piece of streamed text; `index` is the completion it belongs to (0 with one prompt and n = 1)."""

    index: int

    def __new__(cls, text: str, index: int = 0):
        piece = super().__new__(cls, text)
        piece.index = index
        return piece


class RosterOfExperts:
    """Wrap an already-loaded transformers MoE model (the weights are shared, never copied).

    score_memory_bytes bounds the logits one scoring forward holds (`score`, `perplexity`, `token_logprobs`):
    items x positions x K x V logits in the model's dtype plus the float32 copies the aggregation makes stay
    within it (default 1 GiB), so scoring memory does not grow with K. The floor is one item and one position
    per forward (K x V logits), which runs even when it exceeds the budget; None: no bound (8 items x 64
    positions per forward). Scores do not depend on it, up to float rounding.
    """

    def __init__(self, model, tokenizer, roe: RoEConfig | None = None, compile: str = "auto",
                 score_memory_bytes: int | None = DEFAULT_SCORE_MEMORY):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.compile = compile  # the decode step: "auto" compiles it on CUDA, "on" everywhere, "off" never
        self.score_memory_bytes = check_budget(score_memory_bytes)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = roe if roe is not None else RoEConfig()
        if not isinstance(self.config, RoEConfig):
            raise TypeError(f"roe must be a RoEConfig, got {type(self.config).__name__}")
        self.routers = adapters.patch(model)
        self.num_experts = [adapters.num_experts(model, r) for r in self.routers]  # the noise width per layer
        self.taus = layer_taus(self.config.tau, self.config.skip_layers, len(self.routers))
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        self.max_context = getattr(adapters.text_config(model.config), "max_position_embeddings", None)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        roe: RoEConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = "auto",
        trust_remote_code: bool = False,
        compile: str = "auto",
        score_memory_bytes: int | None = DEFAULT_SCORE_MEMORY,
        **model_kwargs,
    ) -> RosterOfExperts:
        """Load a checkpoint (a local folder, a hub id, or `builtin[:size]`) with safetensors only.
        dtype: "auto" (the default, as in transformers and lm-eval: the dtype the checkpoint records),
        torch.bfloat16 / float16 / float32 or their names. compile and score_memory_bytes: as in the constructor.
        Everything that can be checked without the weights (device, dtype, config, architecture, the weight
        files' headers) is checked before they load, each failing in one line (`roe.loading`)."""
        check_budget(score_memory_bytes)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        dtype, device = loading.check_dtype(dtype), loading.check_device(device)
        from transformers import AutoTokenizer

        from .builtin import resolve_model

        name = str(name_or_path)
        path, default_roe = resolve_model(name)
        config = _load_config(name, path, trust_remote_code)
        adapters.check_supported(config)  # fail before loading gigabytes of weights
        loading.check_weights(name, path)
        try:
            with loading.loading_bars(path):
                model = _auto_model_class(config).from_pretrained(
                    path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise loading.load_error(name, e) from None
        except Exception as e:  # safetensors' SafetensorError: a file changed or was damaged after the checks
            if type(e).__name__ != "SafetensorError":
                raise
            raise loading.load_error(name, e) from None
        return cls(model.to(device), tokenizer, roe if roe is not None else default_roe, compile=compile,
                   score_memory_bytes=score_memory_bytes)

    def with_config(self, **changes) -> RosterOfExperts:
        """The same weights with other RoE settings (no reload); `compile` and `score_memory_bytes` may change
        too, and are carried over otherwise."""
        compile = changes.pop("compile", self.compile)
        budget = changes.pop("score_memory_bytes", self.score_memory_bytes)
        return RosterOfExperts(self.model, self.tokenizer, self.config.replace(**changes), compile=compile,
                               score_memory_bytes=budget)

    def unwrap(self):
        """Remove RoE's hooks from the model and return it, exactly as it was."""
        adapters.unpatch(self.model)
        return self.model

    def new_pass(self, seeds: list[int], record_experts: bool = False, capacity: int | None = None,
                 positions: int = 1, **engine_options) -> RoEPass:
        """A batched run for len(seeds) prompts over `capacity` cache slots (prompt width + new tokens; it grows
        when exceeded); engine_options switch engine optimisations off or choose a compile backend (see RoEPass).
        positions: the most positions one step runs (1 for decoding; scoring's chunk). A step that cannot fit
        in the device's free memory is refused here, before anything is allocated (`roe.memory`)."""
        c = self.config
        check_step_fits(self.model, len(seeds), c.num_samples, positions, capacity or 1, c.cache == "full",
                        len(self.routers))
        if getattr(self.model, "_roe_hooks", None) is None:  # another roster on this model unwrapped it
            adapters.patch(self.model)
        engine_options.setdefault("compile", self.compile_backend)
        if c.adaptive_metric is not None:  # adaptive K: the rule that decides, per token, whether noisy samples run
            engine_options.setdefault("adaptive", (c.adaptive_metric, c.adaptive_threshold))
        return RoEPass(self.model, self.taus, self.num_experts, c.num_samples, c.cache, seeds, record_experts,
                       aggregate=c.aggregate, capacity=capacity, **engine_options)

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend of the decode step: inductor on CUDA under "auto", everywhere under "on"."""
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        return "inductor" if self.compile == "on" or (self.compile == "auto" and on_cuda) else None

    # ---- input checks -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, reserve: int = 0) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty: give at least one character of text")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        self._check_length(len(ids), reserve, "prompt")
        return ids

    def _check_length(self, n: int, reserve: int, what: str) -> None:
        if self.max_context is not None and n + reserve > self.max_context:
            extra = f" plus {reserve} new tokens" if reserve else ""
            raise ValueError(
                f"the {what} has {n} tokens{extra}, more than the model's context of {self.max_context} tokens"
            )

    @staticmethod
    def _as_list(prompts: str | Sequence[str], what: str) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"no {what} given")
        return prompts

    # ---- generation ---------------------------------------------------------------------------------
    def completion_seeds(self, num_prompts: int, seeds: Sequence[int] | None = None, n: int = 1) -> list[int]:
        """The seed of every completion, prompt-major: completion i of prompt j uses `seeds[j] + i`.

        `seeds` gives one seed per prompt (default: `config.seed` for every prompt); it is the seed of that
        prompt's first completion, used exactly as given. With n = 1 each prompt runs with its own seed, as
        before `n` existed. This is the server's derivation of `n` too (its request seed plus the choice index).
        Seeds must be integers with 0 <= seed < 2**63 (`roe.routing.SEED_RANGE`), the derived ones included.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (completions per prompt) must be an integer >= 1, got {n!r}")
        if seeds is None:
            base = [self.config.seed] * num_prompts
            what = "config.seed"
        else:
            if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
                raise TypeError(f"seeds must be a list with one integer per prompt, got {type(seeds).__name__}"
                                + (" (for one prompt, write seeds=[s])" if isinstance(seeds, int) else ""))
            base = list(seeds)
            if len(base) != num_prompts:
                raise ValueError(f"{len(base)} seeds for {num_prompts} prompt(s): give exactly one seed per prompt "
                                 "(it seeds the prompt's first completion; completion i uses seed + i)")
            what = "seed"
        lo, hi = SEED_RANGE
        out = []
        for s in base:
            if isinstance(s, bool):
                raise TypeError(f"a {what} must be an integer, got {s!r}")
            try:
                s = operator.index(s)
            except TypeError:
                raise TypeError(f"a {what} must be an integer, got {s!r} ({type(s).__name__})") from None
            if not lo <= s < hi:
                raise ValueError(f"{what} {s} is out of range: seeds must satisfy 0 <= seed < 2**63")
            if s + n - 1 >= hi:
                raise ValueError(f"{what} {s} with n = {n}: completion i uses seed + i, and {s} + {n - 1} is not "
                                 "below 2**63; choose a smaller seed")
            out += [s + i for i in range(n)]
        return out

    def generate_completions(
        self, prompts: str | Sequence[str], max_new_tokens: int = 64, do_sample: bool = False,
        temperature: float = 1.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
        seeds: Sequence[int] | None = None, n: int = 1,
    ) -> list[Completion]:
        """Like `generate`, with token ids, counts and finish reasons (same arguments, same order of results)."""
        params = SamplingParams(max_new_tokens, do_sample, temperature, top_p, stop)
        prompts = self._as_list(prompts, "prompts")
        all_seeds = self.completion_seeds(len(prompts), seeds, n)
        ids = [self.encode_prompt(p, max_new_tokens) for p in prompts]
        ids = [x for x in ids for _ in range(n)]
        outs: list[Completion] = []
        for outs in decode_steps(self, ids, params, all_seeds, text_each_step=False):
            pass
        return outs

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, n: int = 1) -> list[str]:
        """The generated text only (without the prompt): n strings per prompt, prompt-major, so the completions
        of prompt j are `out[j * n : (j + 1) * n]` (one string per prompt with the default n = 1).

        Seeds. One seed fixes both the routing noise and the sampling draws of a completion: the same prompt
        with the same seed gives the same tokens, alone or batched (exactly in float32; in 16-bit, rounding near
        a tie can flip a token, as it does for plain transformers batched against alone). `seeds` gives one seed
        per prompt (default: `config.seed` for all), so `generate([p] * 4, do_sample=True)` returns four equal
        strings; for several samples of a prompt ask for `n`: completion i of a prompt with seed s uses seed
        s + i (as the server's `n` does), and n = 1 is exactly the single completion of seed s. `seeds` and `n`
        combine: `seeds` is then each prompt's first seed. Seeds must satisfy 0 <= seed < 2**63.
        The routing noise at a position depends on (seed, position) only, not on the prompt: prompts that use
        the same seed share the noise at each position; give them distinct seeds for independent noise.
        """
        outs = self.generate_completions(prompts, max_new_tokens, do_sample, temperature, top_p, stop, seeds, n)
        return [o.text for o in outs]

    def stream(self, prompt: str | Sequence[str], max_new_tokens: int = 64, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
               seed: int | None = None, seeds: Sequence[int] | None = None, n: int = 1) -> Iterator[StreamPiece]:
        """Yield text pieces as they are decoded (stop strings never leak out).

        Each piece is a `str` with an `index` attribute: the completion it belongs to, numbered as `generate`
        orders its results (completion i of prompt j has index j * n + i). With one prompt and n = 1 every
        piece has index 0, and joining the pieces gives `generate`'s string. With several completions, pieces
        of different completions interleave in decoding order.
        `seed`: the seed of every prompt (default `config.seed`); `seeds`: one per prompt instead (give one of
        the two). Seeds, `n` and batching behave as in `generate`, whose docstring says what a seed fixes.
        """
        params = SamplingParams(max_new_tokens, do_sample, temperature, top_p, stop)
        prompts = self._as_list(prompt, "prompts")
        if seed is not None:
            if seeds is not None:
                raise ValueError("give seed (one for every prompt) or seeds (one per prompt), not both")
            seeds = [seed] * len(prompts)
        all_seeds = self.completion_seeds(len(prompts), seeds, n)
        ids = [self.encode_prompt(p, max_new_tokens) for p in prompts]
        ids = [x for x in ids for _ in range(n)]
        return self._stream(ids, params, all_seeds)

    def _stream(self, ids: list[list[int]], params: SamplingParams, seeds: list[int]) -> Iterator[StreamPiece]:
        sent = [0] * len(ids)
        done = [False] * len(ids)
        for outs in decode_steps(self, ids, params, seeds):
            for i, out in enumerate(outs):
                if done[i]:
                    continue
                piece = new_text(out, sent[i], params.stop)
                if piece:
                    yield StreamPiece(piece, i)
                    sent[i] += len(piece)
                done[i] = out.finish_reason is not None
            if all(done):
                return

    # ---- scoring ------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise TypeError("contexts and continuations must be strings")
        if not continuation:
            raise ValueError("a continuation is empty: there is nothing to score")
        whole = self.tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
        ctx = self.tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
        if not ctx:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise ValueError("a context is empty and the tokenizer has no BOS token to condition on")
            ctx = [bos]
            whole = ctx + self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            cont = whole[len(ctx) :]
        else:  # the tokenizer merged across the boundary; score the continuation's own tokens
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        self._check_length(len(ctx) + len(cont), 0, "context plus continuation")
        return ctx, cont

    def token_logprobs(self, pairs: list[tuple[list[int], list[int]]], with_greedy: bool = False) -> list:
        """Per-token log-probs of each (context_ids, continuation_ids); with_greedy: (log-probs, is_greedy) pairs."""
        vocab, logit_bytes = logit_width(self.model)
        items, positions = chunk_shape(self.config.num_samples, vocab, logit_bytes, self.score_memory_bytes,
                                       len(pairs))
        out = []
        for i in range(0, len(pairs), items):
            batch = pairs[i : i + items]
            out += continuation_logprobs(self, batch, [self.config.seed] * len(batch), positions)
        return out if with_greedy else [lp for lp, _ in out]

    def score(self, contexts: str | Sequence[str], continuations: str | Sequence[str]) -> list[float]:
        """Summed log-prob of each continuation given its context, under RoE."""
        contexts = self._as_list(contexts, "contexts")
        continuations = self._as_list(continuations, "continuations")
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations: give one of each per item")
        pairs = [self._split(c, x) for c, x in zip(contexts, continuations)]
        return [float(lp.sum()) for lp in self.token_logprobs(pairs)]

    def perplexity(self, texts: str | Sequence[str]) -> float:
        """exp of the mean negative log-prob per token over all texts (the first token of each is the context)."""
        pairs = []
        for t in self._as_list(texts, "texts"):
            ids = self.encode_prompt(t)
            if len(ids) < 2:
                raise ValueError(f"text {t[:40]!r} has fewer than 2 tokens: perplexity needs at least one predicted token")
            pairs.append((ids[:1], ids[1:]))
        lps = self.token_logprobs(pairs)
        total = sum(float(lp.sum()) for lp in lps)
        count = sum(lp.numel() for lp in lps)
        return math.exp(-total / count)

    def __repr__(self) -> str:
        return f"RosterOfExperts({self.model.config.model_type}, {len(self.routers)} MoE layers, {self.config})"



def _load_config(name: str, path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise loading.config_error(name, path, e, trust_remote_code) from None


def _auto_model_class(config):
    """AutoModelForCausalLM, which loads a multimodal checkpoint's language model alone where transformers maps it
    (qwen3_5_moe, llama4); otherwise the multimodal model (qwen3_vl_moe), whose language model RoE runs on text."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText
