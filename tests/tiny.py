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

# DeepSeek-V3's MLA and shared expert, for the types that reuse them (A.X-K1, Sarvam-MLA)
MLA = dict(n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=16,
           n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
           num_key_value_heads=4)

# DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): MLA plus an indexer that keeps the index_topk best keys
DSA = dict(n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=16,
           n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
           num_key_value_heads=4, index_topk=4, index_head_dim=8, index_n_heads=8)

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
    # DeepSeek-like (arch-c)
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
                        moe_intermediate_size=16, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4),
    # sparse attention (DSA): index_topk below the test sequences' lengths, so the indexer's choice matters
    "deepseek_v32": dict(DSA, n_group=4, topk_group=2),
    "glm_moe_dsa": dict(DSA, n_group=1, topk_group=1, indexer_types=["full", "shared", "full", "shared"]),
    "hy_v4": dict(DSA, n_group=4, topk_group=2, indexer_types=["full", "shared", "full", "shared"], hc_mult=2),
    "solar_open": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16,
                       n_shared_experts=1, head_dim=8, routed_scaling_factor=1.5),
    "mimo_v2_flash": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16,
                          head_dim=12, v_head_dim=8, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"] * 2),
    "axk1": dict(MLA, n_group=4, topk_group=2),
    "sarvam_mla": dict(MLA, n_group=4, topk_group=2),
    "kolibri1": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                     head_dim=8, norm_topk_prob=True, sliding_window=4,
                     layer_types=["sliding_attention", "full_attention"] * 2),
}

# sliding-window variants of the architectures that have one: name -> (model_type, config overrides).
# The window (4) is shorter than the test prompts plus their generations, so it changes the outputs.
SLIDING = {
    "mixtral-sliding": ("mixtral", dict(sliding_window=4)),
    "qwen2_moe-sliding": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=4)),
    "qwen3_moe-sliding": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4)),
    "dots1-sliding": ("dots1", dict(sliding_window=4, max_window_layers=2)),
}

# other variants: name -> (model_type, config overrides). The sparse-attention indexers with index_topk above every
# test sequence (every key is read: the indexer changes nothing, and every path must agree exactly)
VARIANTS = {
    "glm_moe_dsa-all-keys": ("glm_moe_dsa", dict(index_topk=64)),
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
    model_type, overrides = {**SLIDING, **VARIANTS}.get(arch, (arch, {}))
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **ARCHS[model_type], **overrides})
    return init_decisive(AutoModelForCausalLM.from_config(cfg), seed)  # every random weight comes from seed


# below a layer's output (about unit scale): the residual stream is mostly the layers' work, so removing them
# changes the outputs (with 1.0, up to 26% of the greedy choices stayed; pre-norm layers see unit scale anyway)
EMBED_STD = 0.5
ROUTER_SUFFIXES = ("gate.weight", "gate.wg.weight", "router.weight", "router.layer.weight")
LOGIT_STD = 3.0  # the spread of the logits: a clear greedy choice, yet sampling still has several tokens to pick from
# the spread of the router logits: a clear top-k choice, yet tau = 0.5 flips some of them, and the second expert's
# softmax weight is not negligible (where the top-k weights are not renormalised: olmoe, flex_olmo, qwen3_moe)
ROUTER_LOGIT_STD = 2.0


@torch.no_grad()
def init_decisive(model, seed: int):
    """Re-initialise a randomly built model so that every layer and every routing choice shows in its outputs.

    transformers' initializer_range (0.02 for every weight) leaves each layer's output tiny next to its input
    and the logits nearly flat (std about 0.1): with every decoder layer removed, 27-52% of the greedy
    choices stayed the same (tests/test_tiny.py). Here every matrix is normal(0, 1/sqrt(fan_in)), so a layer's
    output is about unit scale, larger than the embeddings (EMBED_STD); lm_head gives logits of std LOGIT_STD and
    the routers router logits of std ROUTER_LOGIT_STD. Biases, gpt_oss's attention sinks and the expert-score
    correction biases are random, so a code path that drops one of them changes the outputs. Norm weights stay 1.
    The same seed gives the same weights.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal_(tensor, std):
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)

    hidden = model.config.hidden_size
    for name, module in model.named_modules():
        # expert weights: [E, out, in], or [E, in, out] where the experts class says is_transposed (gpt_oss)
        fan_in_dim = 1 if getattr(module, "is_transposed", False) else -1
        for pname, p in module.named_parameters(prefix=name, recurse=False):
            if pname.endswith(ROUTER_SUFFIXES):  # the router's input is normalised: unit scale
                normal_(p, ROUTER_LOGIT_STD / p.shape[-1] ** 0.5)
            elif pname == "model.embed_tokens.weight":
                normal_(p, EMBED_STD)
            elif pname == "lm_head.weight":  # the final norm gives unit-scale hidden states
                normal_(p, LOGIT_STD / hidden ** 0.5)
            elif p.dim() >= 2:
                normal_(p, p.shape[fan_in_dim] ** -0.5)
            elif pname.endswith(("bias", "sinks")):  # next to unit-scale activations (sinks: attention scores)
                # the correction biases shift router probabilities or sigmoid scores (ernie's moe_statics here)
                normal_(p, 0.1 if "correction" in pname else 0.5)
            # else a norm weight: stays 1
        for bname, b in module.named_buffers(prefix=name, recurse=False):
            if bname.endswith("e_score_correction_bias"):  # deepseek_v3, glm4_moe, dots1: added to sigmoid scores
                normal_(b, 0.1)
    return model.eval()


def save_tiny(arch: str, path, seed: int = 0):
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
