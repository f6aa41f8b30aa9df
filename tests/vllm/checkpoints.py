"""Tiny random checkpoints for the vLLM tests: head size 64 (vLLM's CPU attention has no kernel for 8 or 24)."""

from __future__ import annotations

import sys
from pathlib import Path

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
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=64, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"] * 2),  # not ported: RoE must refuse it
    "llama": dict(),  # dense: RoE must refuse it
}

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
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
