"""lm-evaluation-harness integration: the `roe` model.

    lm_eval --model roe --model_args pretrained=PATH,num_samples=8,tau=0.3,skip_layers=1 --tasks TASK

lm-eval has no plugin entry points, so installing roster-of-experts also installs a two-line import hook
(`roster_of_experts_lm_eval.pth` -> `_roe_lm_eval_hook`) that adds `roe` to lm-eval's model registry
when lm-eval is imported. `python -m roe.harness ARGS` runs lm-eval's own CLI with the model registered,
for environments where .pth files are not processed.

All three request types go through the RoE engine: loglikelihood and loglikelihood_rolling through
teacher-forced scoring, generate_until through the generation loop.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import Collator

from .config import RoEConfig
from .options import adaptive_changes
from .progress import progress
from .roster import RosterOfExperts


def _number(value, kind, name):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name} must be a {kind.__name__}, got {value!r}") from None


def _dtype(value):
    """lm-eval's `hf` spellings: "auto" (the checkpoint's own dtype, the default as in `hf`) or a torch dtype name."""
    from .loading import check_dtype

    try:
        return check_dtype(value)
    except ValueError as e:
        raise ValueError(f"model_args {e}") from None


def _device(device) -> str:
    """The device as lm-eval's `hf` picks it: the one asked for, or (no --device) CUDA when there is one, else the
    CPU, saying so in a log line. A device asked for that is not there is a one-line error (roe.loading)."""
    if device:
        return str(device)
    import logging

    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    logging.getLogger("lm_eval.models.roe").info("roe: no device given (--device); using %s (CUDA available: %s)", chosen,
                                      torch.cuda.is_available())
    return chosen


def _generation_args(gen_kwargs: dict, default_max: int) -> dict:
    """lm-eval's generation kwargs, read as its `hf` model reads them -> RosterOfExperts.generate's kwargs."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = default_max
    for alias in ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks"):  # lowest priority first
        if kwargs.get(alias) is not None:
            max_new = kwargs[alias]
        kwargs.pop(alias, None)
    temperature = float(kwargs.pop("temperature", 0.0))
    do_sample = kwargs.pop("do_sample", None)
    do_sample = temperature > 0.0 if do_sample is None else bool(do_sample) and temperature > 0.0
    top_p = float(kwargs.pop("top_p", 1.0))
    if kwargs:
        raise ValueError(f"generation arguments roe does not support: {', '.join(sorted(kwargs))}")
    out = dict(max_new_tokens=int(max_new), do_sample=do_sample, stop=until or None)
    if do_sample:
        out.update(temperature=temperature, top_p=top_p)
    return out


class RoELM(LM):
    def __init__(self, pretrained: str = "builtin", num_samples=None, tau=None, skip_layers=None, aggregate=None,
                 cache=None, seed=None, profile=None, device: str | None = None, dtype="auto", batch_size=8,
                 adaptive_metric=None, adaptive_threshold=None,
                 max_gen_toks: int = 256, trust_remote_code: bool = False, compile: str = "auto", **unknown):
        super().__init__()
        unknown.pop("max_length", None)
        if unknown:
            raise ValueError(f"unknown model_args for roe: {', '.join(sorted(unknown))}")
        roster = RosterOfExperts.from_pretrained(pretrained, device=_device(device), dtype=_dtype(dtype),
                                                 trust_remote_code=str(trust_remote_code).lower() == "true",
                                                 compile=str(compile))
        base = RoEConfig.from_profile(profile) if profile else roster.config
        changes = {}
        if num_samples is not None:
            changes["num_samples"] = _number(num_samples, int, "num_samples")
        if tau is not None:  # a per-layer list uses ';' because lm-eval splits model_args on ','
            taus = [_number(t, float, "tau") for t in str(tau).split(";")]
            changes["tau"] = taus[0] if len(taus) == 1 else taus
        if skip_layers is not None:
            changes["skip_layers"] = _number(skip_layers, int, "skip_layers")
        if aggregate is not None:
            changes["aggregate"] = aggregate
        if cache is not None:
            changes["cache"] = cache
        if seed is not None:
            changes["seed"] = _number(seed, int, "seed")
        if adaptive_metric is not None or adaptive_threshold is not None:  # adaptive K ("off" clears a profile's)
            changes.update(adaptive_changes(adaptive_metric, None if adaptive_threshold is None
                                            else _number(adaptive_threshold, float, "adaptive_threshold")))
        self.roster = RosterOfExperts(roster.model, roster.tokenizer, base.replace(**changes), compile=roster.compile)
        self.batch_size = _number(batch_size, int, "batch_size") if batch_size != "auto" else 8
        self.max_gen_toks = _number(max_gen_toks, int, "max_gen_toks")

    @classmethod
    def from_roster(cls, roster: RosterOfExperts, batch_size: int = 8, max_gen_toks: int = 256) -> RoELM:
        """The lm-eval model over an already-loaded roster (its weights and RoE settings), e.g. for `roe study`."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm.roster, lm.batch_size, lm.max_gen_toks = roster, batch_size, max_gen_toks
        return lm

    def get_model_info(self) -> dict:
        """What lm-eval records in the results' config (as for its `hf` model), plus the RoE settings."""
        model = self.roster.model
        return {"model_num_parameters": sum(p.numel() for p in model.parameters()), "model_dtype": str(model.dtype),
                "roe": self.roster.config.to_dict(), "roe_compile": self.roster.compile}

    def _score(self, pairs, disable_tqdm):
        results = []
        bar = progress(total=len(pairs), disable=disable_tqdm, desc="roe loglikelihood")
        for i in range(0, len(pairs), self.batch_size):
            batch = pairs[i : i + self.batch_size]
            results += self.roster.token_logprobs(batch, with_greedy=True)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for req in requests:
            context, continuation = req.args
            n_spaces = len(context) - len(context.rstrip())  # lm-eval's convention: trailing spaces move right
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            pairs.append(self.roster._split(context, continuation))
        return [(float(lp.sum()), bool(greedy)) for lp, greedy in self._score(pairs, disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        prefix = self.roster.tokenizer.eos_token_id
        pairs = []
        for req in requests:
            ids = self.roster.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            self.roster._check_length(len(ids) + 1, 0, "text")
            pairs.append(([prefix], ids))
        return [float(lp.sum()) for lp, _ in self._score(pairs, disable_tqdm)]

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Requests with the same generation arguments go through `generate` together, `batch_size` at a time,
        in the order lm-eval's `hf` model batches them (longest context first), so the padded batches are the same."""
        tokenizer = self.roster.tokenizer

        def longest_first(args):
            return -len(tokenizer(args[0], add_special_tokens=True)["input_ids"]), args[0]

        batches = Collator([req.args for req in requests], sort_fn=longest_first, group_by="gen_kwargs",
                           group_fn=lambda args: args[1])
        out = []
        bar = progress(total=len(requests), disable=disable_tqdm, desc="roe generate_until")
        for chunk in batches.get_batched(n=self.batch_size):
            contexts = [context for context, _ in chunk]
            out += self.roster.generate(contexts, **_generation_args(chunk[0][1], self.max_gen_toks))
            bar.update(len(chunk))
        bar.close()
        return batches.get_original(out)


import lm_eval.models  # noqa: E402,F401  (lm-eval's own models first: an empty registry is filled lazily)

if "roe" not in model_registry:
    model_registry.register("roe", target=RoELM)


def main(argv=None) -> None:
    """Run lm-eval's own command line with the `roe` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
