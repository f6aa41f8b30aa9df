"""Tiny random checkpoints for the vLLM tests: head size 64 (vLLM's CPU attention has no kernel for 8 or 24)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import init_decisive, tiny_tokenizer  # noqa: E402  (the main suite's tokenizer and weights)

COMMON = dict(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    # a sliding window shorter than the longer sequences, and grouped-query attention
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=1, sliding_window=16),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=64,
                      num_attention_heads=4, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=64, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "llama": dict(),  # dense: RoE must refuse it
    # Llama 4 (text): top-1 sigmoid router; layers 0-2 chunked local attention (chunk 32: vLLM's CPU backend needs
    # a multiple of the KV block size, and the tests start it with block_size=32), layer 3 NoPE with full attention
    # and attention temperature tuning (floor_scale 8: the query scale changes every 8 positions)
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=64, head_dim=64,
                        attention_chunk_size=32, no_rope_layer_interval=4, floor_scale=8, attn_scale=0.1,
                        attn_temperature_tuning=True),
    # Phi-3.5-MoE: sparsemixer top-2 (router_jitter_noise 0.01: vLLM's sparsemixer hard-codes jitter_eps = 0.01);
    # saved under Phi-3.5-MoE's own architecture name (vLLM registers PhiMoEForCausalLM, transformers writes
    # PhimoeForCausalLM) and weight names (transformers 5 writes block_sparse_moe.experts.E.w1/w2/w3); vLLM's
    # PhiMoE always has q/k/v/o and lm_head biases, and never adds the lm_head's: that one is zero (ZERO)
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.01, attention_bias=True,
                   lm_head_bias=True),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0,
                         moe_num_shared_experts=0, head_dim=64),  # not ported: RoE must refuse it
    # vllm-ports: GLM-4.5's grouped sigmoid router with correction bias and routed_scaling_factor; layer 0 dense,
    # so 5 layers give 4 MoE layers (the tests skip the first and the last)
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                     moe_intermediate_size=32, n_shared_experts=1, head_dim=64, num_hidden_layers=5,
                     routed_scaling_factor=2.5, norm_topk_prob=True),
}

# bias std relative to init_decisive's 0.5: GPT-OSS has a bias on every projection (q, k, v, o, experts); at 0.5
# they add a constant to the residual stream that outweighs the input, and greedy decoding falls into a loop of
# two tokens that no routing noise changes (measured: K = 8, tau = 0.5 gave plain vLLM's tokens exactly)
BIAS_SCALE = {"gpt_oss": 0.2, "phimoe": 0.2}  # phimoe: attention and LayerNorm biases, the same loop

# parameters set to zero after init_decisive, where vLLM does not compute with them
ZERO = {"phimoe": ("lm_head.bias",)}

# architecture names as the real checkpoints spell them where transformers writes another
ARCHITECTURES = {"phimoe": ["PhiMoEForCausalLM"]}

# what vLLM must be started with for these checkpoints (the same with and without `roe`): vLLM turns Llama 4's
# temperature tuning on from the generation config (else only above 32K context), transformers from the config
LLM_ARGS = {"llama4_text": dict(block_size=32, override_generation_config={"attn_temperature_tuning": True})}

# vllm-mla group (issue 22): MLA needs vLLM's real latent sizes on the CPU (kv_lora_rank 512 + rope 64 = its
# kernels' 576) and bfloat16; few layers and a small hidden size keep them tiny. DeepSeek-V2 as V2-Lite has it
# (no q LoRA, one expert group), V3 with q LoRA and grouped sigmoid scores plus a correction bias.
MLA = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
           first_k_dense_replace=0, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
           routed_scaling_factor=1.5, rope_scaling=None)
ARCHS.update({
    "deepseek_v2": dict(MLA, q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False),
    # vLLM reads scoring_func (default softmax); transformers' V3 always scores with a sigmoid
    "deepseek_v3": dict(MLA, q_lora_rank=64, n_group=4, topk_group=2, topk_method="noaux_tc", norm_topk_prob=True,
                        scoring_func="sigmoid"),
})
# Gated DeltaNet (qwen3_next): the CPU kernels need bfloat16 and head dim 128; layer 0 recurrent and shared (before
# the fan-out), a full-attention layer in the middle
ARCHS["qwen3_next"] = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=64,
                           shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
                           norm_topk_prob=True, layer_types=["linear_attention", "linear_attention",
                                                             "full_attention", "linear_attention"],
                           linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=128,
                           linear_value_head_dim=128, linear_conv_kernel_dim=4)
# the MLA checkpoints run only under these vLLM options: the CPU rotary-embedding kernel is wrong from the
# second token on (the native rotary is right), and CPU_MLA is the backend whose latent cache RoE reads
MLA_VLLM = dict(dtype="bfloat16", attention_config={"backend": "CPU_MLA"},
                compilation_config={"custom_ops": ["all", "-rotary_embedding"]})

# a chat template for the server test (the tiny tokenizer has none)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def save(arch: str, path: Path, seed: int = 0) -> Path:
    cfg = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch]})
    model = AutoModelForCausalLM.from_config(cfg)
    init_decisive(model, seed)  # router logits of spread ~2: routing matters, and tau = 0.5 flips some choices
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ZERO.get(arch, ()):
                p.zero_()
    if arch in BIAS_SCALE:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") and ".router." not in name:  # the router's bias keeps its spread
                    p.mul_(BIAS_SCALE[arch])
    model.save_pretrained(path)
    if arch in ARCHITECTURES:  # after saving: save_pretrained writes the class's own name
        config = json.loads((Path(path) / "config.json").read_text())
        (Path(path) / "config.json").write_text(json.dumps({**config, "architectures": ARCHITECTURES[arch]}, indent=2))
    tiny_tokenizer().save_pretrained(path)
    return path
