"""The generation loop: greedy or sampled decoding from the aggregated distribution, EOS, stop strings, streaming."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .engine import pad_batch
from .routing import noise_seed

_SAMPLING_STREAM = 0x5A3D1E  # keeps the sampling generator's seed apart from the routing noise seeds


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | Sequence[str] | None = ()

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r} (use do_sample=False for greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError("temperature and top_p only apply with do_sample=True; greedy decoding ignores them")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stops)


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    # with top_logprobs: per generated token, and the EOS that ended the completion, (token id, its log-prob,
    # the top_logprobs most likely (id, log-prob) pairs) under the aggregated distribution that picked it
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # characters at the end of `text` that are not final yet (they could still become a stop string, or are an
    # unfinished multi-byte character); None: not tracked (new_text then works it out from the text)
    held: int | None = None


def choose_next(logprobs: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """logprobs [B, V] (aggregated, normalised) -> next token ids [B]."""
    if not params.do_sample:
        return logprobs.argmax(dim=-1)
    probs = torch.softmax(logprobs / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p  # keep the smallest head whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs.cpu()
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_window(stops: Sequence[str]) -> int:
    """Tokens at the end of a completion whose text holds every stop string the newest token can complete (0: no
    stops). A stop of L characters spans at most L + 1 tokens; the margin covers what decoding a slice alone
    changes at its start (a split multi-byte character, a leading space the tokenizer drops)."""
    return 2 * max(map(len, stops)) + 8 if stops else 0


def _prefix_function(s: str) -> list[int]:
    """KMP: f[i] = the length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    """Finds stop strings in a completion's growing text, looking at each new character once per stop string (a
    KMP automaton each): O(new text x number of stops) per step, whatever the stop strings' length (searching
    the text's tail for each stop, and testing each of its prefixes against the end, cost O(its length) and
    O(its length squared) per step). A trailing U+FFFD (a multi-byte character not finished yet) is not fed until
    the tokens after it settle it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.fail = [_prefix_function(s) for s in self.stops]
        self._reset()

    def _reset(self) -> None:
        self.states = [0] * len(self.stops)  # per stop: how much of it the fed text ends with
        self.fed = ""

    def feed(self, text: str) -> int | None:
        """text: the whole text so far. -> where the earliest stop string in it starts, or None."""
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.fed):  # the tokenizer rewrote what it had decoded: start over
            self._reset()
        first = None
        for pos in range(len(self.fed), len(stable)):
            c = stable[pos]
            for j, s in enumerate(self.stops):
                k, f = self.states[j], self.fail[j]
                while k and s[k] != c:
                    k = f[k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):  # a whole stop string ends here
                    first = pos - k + 1 if first is None else min(first, pos - k + 1)
                    k = f[k - 1]
                self.states[j] = k
        self.fed = stable
        return first

    def held(self, text: str) -> int:
        """Characters at the end of `text` (as last fed) that could still become a stop string, or are unfinished."""
        return len(text) - len(self.fed) + max(self.states, default=0)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string (or finish a multi-byte character)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


def decode_steps(roster, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int],
                 text_each_step: bool = True, top_logprobs: int | None = None) -> Iterator[list[Completion]]:
    """Run the loop for B prompts; yields the completions after every step (finished ones marked).

    text_each_step: keep each completion's text current after every step (streaming). Otherwise the text is
    decoded once at the end, and stop strings are looked for in the last few tokens' text after each step, the
    whole text being decoded only where one shows: detokenising a whole completion costs ~65 us at 256 tokens
    here, so a batch of 64 would spend longer on it every step than a compiled GPU step takes.
    top_logprobs: record each completion's `logprobs` (with that many alternatives per token) as it decodes."""
    B = len(prompt_ids)
    pad = roster.pad_token_id
    ids, mask = pad_batch(prompt_ids, max(len(p) for p in prompt_ids), pad, left=True)

    run = roster.new_pass(seeds, capacity=ids.shape[1] + params.max_new_tokens)
    run.prefill(ids[:, :-1], mask[:, :-1])
    current = ids[:, -1:]  # the last prompt token is the first noisy step (clean cache: noise only on the current token)
    generators = [torch.Generator().manual_seed(noise_seed(s, _SAMPLING_STREAM)) for s in seeds]
    outs = [Completion(prompt_tokens=len(p), logprobs=None if top_logprobs is None else []) for p in prompt_ids]
    alive = torch.ones(B, dtype=torch.bool)
    eos = roster.eos_token_ids
    decode = partial(roster.tokenizer.decode, skip_special_tokens=True)
    window = _stop_window(params.stop)
    matchers = [StopMatcher(params.stop) for _ in range(B)] if text_each_step else None
    for _ in range(params.max_new_tokens):
        logprobs = run.decode(current, alive)  # [B, V], aggregated over the K samples
        nxt = choose_next(logprobs, params, generators).cpu()
        if top_logprobs is not None:
            chosen = logprobs.gather(1, nxt[:, None].to(logprobs.device))[:, 0].tolist()
            top = logprobs.topk(top_logprobs, dim=-1) if top_logprobs else None
            alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if top else [[]] * B
        for b in range(B):
            if not alive[b]:
                continue
            out = outs[b]
            tok = int(nxt[b])
            if top_logprobs is not None:
                out.logprobs.append((tok, chosen[b], alts[b]))
            if tok in eos:
                out.finish_reason = "stop"
                alive[b] = False
                continue
            out.token_ids.append(tok)
            if text_each_step:
                stopped = _update_text(out, decode(out.token_ids), matchers[b])
            elif window and _cut_at_stop(decode(out.token_ids[-window:]), params.stop)[1]:
                out.text, stopped = _cut_at_stop(decode(out.token_ids), params.stop)  # where the stop string ends
            else:
                continue
            if stopped:
                out.finish_reason = "stop"
                alive[b] = False
        if not alive.any():
            break
        yield outs
        current = torch.where(alive, nxt, torch.full_like(nxt, pad))[:, None]
    for out in outs:
        if out.finish_reason is None:
            out.finish_reason = "length"
        if not text_each_step:
            out.text = _cut_at_stop(decode(out.token_ids), params.stop)[0]
    yield outs


def _update_text(out: Completion, text: str, matcher: StopMatcher) -> bool:
    """The completion's text is now `text`, cut at a stop string if one formed (-> True)."""
    cut = matcher.feed(text)
    out.text = text if cut is None else text[:cut]
    out.held = matcher.held(text)
    return cut is not None


def new_text(out: Completion, sent: int, stops: Sequence[str]) -> str:
    """The part of a completion's text after `sent` characters that is final (no stop string can still form there)."""
    if out.finish_reason is not None:
        upto = len(out.text)
    else:
        upto = len(out.text) - (_held_back(out.text, stops) if out.held is None else out.held)
    return out.text[sent:upto] if upto > sent else ""


def stream_text(roster, prompt_ids: list[int], params: SamplingParams, seed: int) -> Iterator[str]:
    """Text pieces of one completion as they become final (stop strings never leak out)."""
    sent = 0
    for (out,) in decode_steps(roster, [prompt_ids], params, [seed]):
        piece = new_text(out, sent, params.stop)
        if piece:
            yield piece
            sent += len(piece)
        if out.finish_reason is not None:
            return
