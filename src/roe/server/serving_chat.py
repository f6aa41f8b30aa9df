"""POST /v1/chat/completions: messages formatted with the tokenizer's chat template, or this plain one when it has
none: "System: ...\\nUser: ...\\nAssistant:" (one line per message, ending with "Assistant:"); `logprobs` +
`top_logprobs` report the aggregated RoE distribution's log-probs of the generated tokens."""

from fastapi.responses import Response

from .protocol import APIError, ChatMessage, ChatRequest
from .serving_engine import OpenAIServing


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The tokenizer's chat template, or the plain one documented at the top of this module."""
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    names = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{names[m['role']]}: {m['content']}\n" for m in msgs) + "Assistant:"


class OpenAIServingChat(OpenAIServing):
    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    async def create(self, req: ChatRequest, request):
        n = req.n or 1
        self.check_count(1, n)
        config, max_tokens, seed = self.settings(req, False, n, None)  # OpenAI's default: what fits the context
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        self.check_stream(req, top_n)
        self.check_chars(sum(len(m.content) for m in req.messages))
        _, ids = await self.off_loop(self._encode, req.messages, max_tokens or 1)
        if max_tokens is None:
            context = self.roster.max_context
            max_tokens = self.limits.max_tokens if context is None else min(self.limits.max_tokens, context - len(ids))
        jobs = self.submit([ids], config, self.sampling(req, max_tokens), seed, n, top_n, False)
        rid, created = self.new_id()
        if req.stream:
            def opening(index):  # each choice's stream opens with the assistant's role
                return [self.choice_chunk(index, role=True)]

            return self.streaming(jobs, rid, created, req, opening)
        results = await self.wait_done(jobs, request)
        if results is None:
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        choices = []
        for i, (out, table) in enumerate(results):
            # the generated tokens' log-probs (not the EOS that ended them)
            lp = None if table is None else await self.off_loop(self.logprobs, table[: len(out.token_ids)])
            choices.append({"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                            "finish_reason": out.finish_reason})
        return self.response(rid, created, choices, jobs, [o for o, _ in results], request)

    def _encode(self, messages: list[ChatMessage], reserve: int) -> tuple[str, list[int]]:  # on the tokenizer thread
        try:
            text = chat_prompt(self.roster.tokenizer, messages)
        except Exception as e:  # the chat template refused these messages (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template cannot format these messages: {e}", param="messages") from None
        return text, self.encode_text(text, reserve)

    def choice_chunk(self, index, text=None, finish=None, role=False) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish}

    def logprobs(self, entries) -> dict:  # on the tokenizer thread
        def one(tok, lp):
            text = self.text_of(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(tok, lp), "top_logprobs": [one(a, alp) for a, alp in alts]}
                            for tok, lp, alts in entries],
                "refusal": None}
