"""Tiny random MoE checkpoints of every supported architecture, saved and loaded like real ones."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# model_type -> the extra config fields that make it a small MoE (8 experts, top-2 unless the router needs groups)
ARCHS = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=8),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                        moe_intermediate_size=16, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4, num_key_value_heads=4),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                     moe_intermediate_size=16, n_shared_experts=1, head_dim=8),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                  moe_intermediate_size=16, n_shared_experts=1, head_dim=8),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_layer_start_index=0,
                         moe_num_shared_experts=0, head_dim=8),
}

# sliding-window variants of the architectures that have one: name -> (model_type, config overrides).
# The window (4) is shorter than the test prompts plus their generations, so it changes the outputs.
SLIDING = {
    "mixtral-sliding": ("mixtral", dict(sliding_window=4)),
    "qwen2_moe-sliding": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=4)),
    "qwen3_moe-sliding": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4)),
    "dots1-sliding": ("dots1", dict(sliding_window=4, max_window_layers=2)),
}

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model(arch: str, seed: int = 0):
    model_type, overrides = SLIDING.get(arch, (arch, {}))
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **ARCHS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random routers spread over experts; a larger init makes routing decisive
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 1.0)
    return model.eval()


def save_tiny(arch: str, path, seed: int = 0):
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
