"""POST /v1/completions: prompts as text or token ids, `n` completions each, `logprobs` and `echo` (log-probs of
the aggregated RoE distribution that picked the tokens, with the request's seed), streamed or not.

With `echo`, the first prompt token has no log-prob (null); `max_tokens: 0` with `echo` scores the prompt only. A
completion that ended on EOS lists the EOS token last (as vLLM does), so `echo` + `max_tokens: 1` always has
len(prompt) + 1 entries. Streams do not carry log-probs (400).
"""

from fastapi.responses import Response

from .protocol import APIError, CompletionRequest
from .serving_engine import OpenAIServing


class OpenAIServingCompletion(OpenAIServing):
    kind = chunk_kind = "text_completion"
    id_prefix = "cmpl-"

    async def create(self, req: CompletionRequest, request):
        prompts = req.prompt
        if len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"the request has {len(prompts)} prompts; this server allows at most "
                                f"{self.limits.max_prompts} per request", param="prompt")
        echo, n = bool(req.echo), req.n or 1
        self.check_count(len(prompts), n)
        config, max_tokens, seed = self.settings(req, echo, n, min(16, self.limits.max_tokens))  # OpenAI's default
        params = self.sampling(req, max_tokens)
        self.check_stream(req, req.logprobs)
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                self.check_chars(len(p))
            else:
                self.check_ids(f"prompt {i}: " if len(prompts) > 1 else "", p, max_tokens)
        encoded = await self.off_loop(self._encode_all, prompts, max_tokens)
        jobs = self.submit(encoded, config, params, seed, n, req.logprobs, echo)
        prefixes = [""] * len(jobs)
        if echo:
            shown = [p if isinstance(p, str) else await self.off_loop(self.roster.tokenizer.decode, p) for p in prompts]
            prefixes = [shown[j // n] for j in range(len(jobs))]
        rid, created = self.new_id()
        if req.stream:
            def opening(index):  # the echoed prompt opens each choice's stream
                return [self.choice_chunk(index, prefixes[index])] if prefixes[index] else []

            return self.streaming(jobs, rid, created, req, opening)
        results = await self.wait_done(jobs, request)
        if results is None:
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        choices = []
        for i, (job, (out, table)) in enumerate(zip(jobs, results)):
            lp = None
            if table is not None:
                lp = await self.off_loop(self.logprobs, ([(job.ids[0], None, None)] if echo else []) + table)
            choices.append({"index": i, "text": prefixes[i] + out.text, "logprobs": lp,
                            "finish_reason": out.finish_reason})
        return self.response(rid, created, choices, jobs, [o for o, _ in results], request)

    def _encode_all(self, prompts: list, reserve: int) -> list[list[int]]:  # on the tokenizer thread
        return [self.encode_text(p, reserve) if isinstance(p, str) else p for p in prompts]

    def choice_chunk(self, index, text=None, finish=None, role=False) -> dict:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def logprobs(self, entries) -> dict:  # on the tokenizer thread; offsets index the choice's text
        tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
        for tok, lp, alts in entries:
            text = self.text_of(tok)
            tokens.append(text)
            token_lps.append(lp)
            offsets.append(offset)
            offset += len(text)
            if lp is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for a, alp in alts:
                top.setdefault(self.text_of(a), alp)
            top.setdefault(text, lp)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
