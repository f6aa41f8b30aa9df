"""The project's engine as the reference for the vLLM tests; runs in the main virtual environment.

    python engine_reference.py JOBS.json OUT.json

JOBS: a list of {"path", "roe": RoEConfig fields, "prompts", "max_new_tokens", optional "dtype"}; OUT: per job,
per prompt, {"prompt_ids", "token_ids", "logprobs"} from greedy decoding (clean cache, float32 unless the job
says "dtype"), logprobs being the aggregated log-probability of each generated token (scored teacher-forced,
the generation's semantics); a sequence that stopped at EOS ends with the EOS token, as vLLM reports it. A job
with "score" (a list of [prompt_ids, token_ids]) instead scores those tokens teacher-forced: per pair
{"logprobs", "greedy"} (whether every token is the engine's argmax).
"""

import json
import sys

import torch

from roe import RoEConfig, RosterOfExperts


def run(job: dict) -> list[dict]:
    dtype = getattr(torch, job.get("dtype", "float32"))  # the MLA and GDN checkpoints: vLLM runs them in bfloat16
    roster = RosterOfExperts.from_pretrained(job["path"], roe=RoEConfig(**job["roe"]), dtype=dtype)
    if "score" in job:
        scored = roster.token_logprobs([(ids, tokens) for ids, tokens in job["score"]], with_greedy=True)
        return [{"logprobs": lp.tolist(), "greedy": bool(greedy)} for lp, greedy in scored]
    comps = roster.generate_completions(job["prompts"], max_new_tokens=job["max_new_tokens"])
    out = []
    for prompt, c in zip(job["prompts"], comps):
        ids = roster.encode_prompt(prompt)
        # vLLM's token ids end with the EOS token when a sequence stops there; the engine's do not
        tokens = c.token_ids + ([min(roster.eos_token_ids)] if c.finish_reason == "stop" else [])
        lps = roster.token_logprobs([(ids, tokens)])[0].tolist() if tokens else []
        out.append({"prompt_ids": ids, "token_ids": tokens, "logprobs": lps})
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    jobs = json.load(open(sys.argv[1]))
    json.dump([run(j) for j in jobs], open(sys.argv[2], "w"))
