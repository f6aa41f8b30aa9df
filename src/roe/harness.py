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

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from tqdm import tqdm

from .config import RoEConfig
from .roster import RosterOfExperts


def _number(value, kind, name):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name} must be a {kind.__name__}, got {value!r}") from None


class RoELM(LM):
    def __init__(self, pretrained: str = "builtin", num_samples=None, tau=None, skip_layers=None, aggregate=None,
                 cache=None, seed=None, profile=None, device: str = "cpu", dtype=None, batch_size=8,
                 max_gen_toks: int = 256, trust_remote_code: bool = False, **unknown):
        super().__init__()
        unknown.pop("max_length", None)
        if unknown:
            raise ValueError(f"unknown model_args for roe: {', '.join(sorted(unknown))}")
        roster = RosterOfExperts.from_pretrained(pretrained, device=device, dtype=dtype,
                                                 trust_remote_code=str(trust_remote_code).lower() == "true")
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
        self.roster = RosterOfExperts(roster.model, roster.tokenizer, base.replace(**changes))
        self.batch_size = _number(batch_size, int, "batch_size") if batch_size != "auto" else 8
        self.max_gen_toks = _number(max_gen_toks, int, "max_gen_toks")

    def _score(self, pairs, disable_tqdm):
        results = []
        bar = tqdm(total=len(pairs), disable=disable_tqdm, desc="roe loglikelihood")
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
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="roe generate_until"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            if temperature == 0.0:
                do_sample = False
            sampling = dict(temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0))) if do_sample else {}
            kwargs.pop("top_p", None)
            if kwargs:
                raise ValueError(f"generation arguments roe does not support: {', '.join(sorted(kwargs))}")
            (text,) = self.roster.generate(context, max_new_tokens=max_new, do_sample=do_sample, stop=until or None,
                                           **sampling)
            out.append(text)
        return out


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
