"""Run vLLM with tensor parallelism in its own processes (the tests' engines run in-process, which TP cannot).

    python tp_run.py JSON   # {"path", "tp", "roe", "prompts", "max_tokens"} -> prints TOKENS <json> on success
"""

import json
import os
import sys

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args["tp"])))
    from vllm import LLM, SamplingParams

    llm = LLM(model=args["path"], dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              tensor_parallel_size=args["tp"], kv_cache_memory_bytes=64 << 20, hf_overrides={"roe": args["roe"]})
    outs = llm.generate(args["prompts"], SamplingParams(max_tokens=args["max_tokens"], temperature=0), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
