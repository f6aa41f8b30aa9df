"""Tiny random MoE checkpoints of every supported architecture, saved and loaded like real ones."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

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
    # arch-a (issue 23). Windows (4) shorter than the test prompts plus their generations, so they matter.
    "glm4_moe_lite": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                          moe_intermediate_size=16, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
                          mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "sarvam_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                       moe_intermediate_size=16, n_shared_experts=1, head_dim=8),
    "exaone_moe": dict(num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16,
                       num_shared_experts=1, head_dim=8, sliding_window=4, sliding_window_pattern=2,
                       mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),  # NoPE on the global layers
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=16),
    "granitemoe_swa": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"] * 2,
                           layer_rope_theta=[10000.0, 0, 10000.0, 0]),  # sinks; NoPE on the global layers
    "cohere2_moe": dict(num_experts=8, num_experts_per_tok=2, head_dim=8, logit_scale=1.0, sliding_window=4,
                        sliding_window_pattern=2, first_k_dense_replace=1, num_shared_experts=1),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, rotary_dim=4),
    "afmoe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=1, head_dim=8,
                  num_dense_layers=1, sliding_window=4, global_attn_every_n_layers=2, route_scale=2.5),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=6),
    # arch-b: llama4_text, dbrx, jetmoe, longcat_flash
    # Llama 4: top-1 sigmoid router; layers 0-2 chunked local attention (chunk 4, shorter than the test prompts
    # plus their generations) with RoPE and qk norm, layer 3 NoPE with full attention
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=32, head_dim=8,
                        attention_chunk_size=4, no_rope_layer_interval=4),
    # clip_qkv 1.0 clips a good share of the unit-scale q/k/v: a path that skipped it would show
    # d_model as well as its alias hidden_size: DbrxConfig copies d_model into ffn_config before the alias is set
    "dbrx": dict(d_model=32, ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0),
                 attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=10000.0)),  # rope_theta: read there
    # num_attention_heads is derived: num_key_value_heads * num_experts_per_tok
    "jetmoe": dict(num_local_experts=8, num_experts_per_tok=2, kv_channels=8),
    # 4 decoder layers, each 2 MLA attention blocks (8 cache layers), 2 dense MLPs and 1 MoE; 8 routed experts
    # and 2 zero-computation (identity) experts among the 10 the router scores
    "longcat_flash": dict(num_hidden_layers=8, n_routed_experts=8, zero_expert_num=2, moe_topk=2,
                          expert_ffn_hidden_size=16, routed_scaling_factor=2.0, q_lora_rank=16, kv_lora_rank=16,
                          qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4, num_key_value_heads=4),
    # --- arch-d: sigmoid routers, group-limited softmax, multimodal checkpoints (a "text_config" entry: the tiny
    # language model goes there, the vision tower gets VISION[type]); sliding windows of 4 and dense first layers
    "mellum": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"] * 2, mlp_layer_types=["dense"] + ["sparse"] * 3),
    "aria_text": dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, head_dim=8),
    "flint": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                  head_dim=8, sliding_window=4, mlp_only_layers=[0], decoder_sparse_step=1),  # sinks, NoPE full layers
    "laguna": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                   head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                   num_attention_heads_per_layer=[4, 2, 4, 2], moe_router_logit_softcapping=3.0,
                   moe_routed_scaling_factor=1.5),
    "hy_v3": dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16, head_dim=8,
                  mlp_layer_types=["dense"] + ["sparse"] * 3),
    "beam": dict(num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16, head_dim=8,
                 sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                 mlp_layer_types=["dense"] + ["sparse"] * 3),  # NoPE full layers with a scaled query, gated attention
    "mistral4": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                     moe_intermediate_size=16, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                     qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
                     routed_scaling_factor=1.5,  # a query scale that grows past position 4 (llama_4_scaling_beta)
                     rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=32.0,
                                          original_max_position_embeddings=4, max_position_embeddings=128,
                                          beta_fast=32.0, beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0,
                                          llama_4_scaling_beta=0.1)),
    "qwen3_vl_moe": dict(text_config=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                                          decoder_sparse_step=1, mlp_only_layers=[],
                                          rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                               mrope_section=[2, 1, 1], mrope_interleaved=True))),
    "glm4v_moe": dict(text_config=dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                       first_k_dense_replace=1, moe_intermediate_size=16, n_shared_experts=1,
                                       head_dim=16,  # half of it rotary, in three mrope sections
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.5, mrope_section=[2, 1, 1]))),
    "ernie4_5_vl_moe": dict(text_config=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=[16, 16],
                                             moe_num_shared_experts=1, head_dim=8,
                                             rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                  mrope_section=[1, 1, 2]))),
    # Gemma 4's MoE variant: router and experts beside the dense MLP of every layer; per-layer inputs, a wider
    # head on full layers whose values are their keys (attention_k_eq_v), windows of 4
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16, head_dim=8,
                        global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
                        vocab_size_per_layer_input=128, num_kv_shared_layers=0),
    "muse_spark": dict(text_config=dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                        moe_hidden_size=16, head_dim=8, sliding_window=4, routed_scaling_factor=1.5,
                                        output_multiplier=1.0,  # (router and output logits) decisive, not flat
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        mlp_layer_types=["dense"] + ["sparse"] * 3),
                       audio_config=dict(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_hidden_size=32),
                       out_hidden_size=32, projector_hidden_size=16),
    "deepseek_ocr2": dict(text_config=dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                           topk_method="group_limited_greedy", moe_intermediate_size=16,
                                           n_shared_experts=1, routed_scaling_factor=1.5, head_dim=8,
                                           mlp_layer_types=["dense"] + ["sparse"] * 3)),
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

# the tiny vision towers of the multimodal entries above (never run: RoE's prompts are text)
VISION = {
    "qwen3_vl_moe": dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                         num_position_embeddings=16, deepstack_visual_indexes=[0]),
    "glm4v_moe": dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
    "ernie4_5_vl_moe": dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2),
    "deepseek_ocr2": dict(sam_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                                          image_size=64, window_size=2, global_attn_indexes=[0],
                                          downsample_channels=[16, 32]),
                          encoder_config=dict(hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=8)),
    "muse_spark": dict(num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                       pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16),
}

# hybrid MoEs: recurrent or convolution layers beside attention (the clean cache's states: src/roe/state.py).
# Layer 0 is recurrent, so the shared leading layers (skip_layers=1) include a state; later ones are noisy.
HYBRID_LAYERS = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
HYBRIDS = ["qwen3_next", "qwen3_5_moe_text", "jamba", "granitemoehybrid", "lfm2_moe", "kimi_linear", "minimax"]  # the ARCHS entries below; tests/test_hybrid.py checks each against a reference
ARCHS.update({
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                       shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[],
                       layer_types=HYBRID_LAYERS, linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4),
    "qwen3_5_moe_text": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                             shared_expert_intermediate_size=16, layer_types=HYBRID_LAYERS,
                             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_conv_kernel_dim=4),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=4, attn_layer_offset=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                  mamba_dt_rank=4, use_mamba_kernels=False),
    "granitemoehybrid": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=16,
                             layer_types=HYBRID_LAYERS, mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8,
                             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8),
    "lfm2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=0,
                     layer_types=["conv", "conv", "full_attention", "conv"], conv_L_cache=3),
    "kimi_linear": dict(num_local_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16,
                        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4, layer_types=HYBRID_LAYERS,
                        mlp_layer_types=["sparse"] * 4, linear_head_dim=8, linear_num_heads=4,
                        linear_conv_kernel_dim=4),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, block_size=4,
                    layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"]),
})

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


def tiny_config(arch: str):
    model_type, overrides = {**SLIDING, **VARIANTS}.get(arch, (arch, {}))
    fields = {**ARCHS[model_type], **overrides}
    if "text_config" in fields:  # a multimodal checkpoint: the tiny language model is its text_config
        text = {**COMMON, **fields.pop("text_config")}
        tokens = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return AutoConfig.for_model(model_type, text_config=text, vision_config=VISION[model_type],
                                    tie_word_embeddings=False, **tokens, **fields)
    return AutoConfig.for_model(model_type, **{**COMMON, **fields})


def tiny_model(arch: str, seed: int = 0):
    from roe.roster import _auto_model_class  # the class RoE loads it with (a multimodal model, mistral4)

    cfg = tiny_config(arch)
    return init_decisive(_auto_model_class(cfg).from_config(cfg), seed)  # every random weight comes from seed


# below a layer's output (about unit scale): the residual stream is mostly the layers' work, so removing them
# changes the outputs (with 1.0, up to 26% of the greedy choices stayed; pre-norm layers see unit scale anyway)
EMBED_STD = 0.5
ROUTER_SUFFIXES = ("gate.weight", "gate.wg.weight", "router.weight", "router.layer.weight", "router.classifier.weight")
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

    hidden = model.config.get_text_config(decoder=True).hidden_size  # a multimodal model: its language model's
    for name, module in model.named_modules():
        # expert weights: [E, out, in], or [E, in, out] where the experts class says is_transposed (gpt_oss)
        fan_in_dim = 1 if getattr(module, "is_transposed", False) else -1
        for pname, p in module.named_parameters(prefix=name, recurse=False):
            if pname.endswith("A_log"):  # state decay rates (GDN, Mamba): transformers draws them unseeded
                p.copy_(torch.rand(p.shape, generator=generator) * 2.5 - 1.0)  # A = exp(A_log) in [0.37, 4.5]
            elif pname.endswith("router.proj.weight"):  # Gemma 4: its input is scaled to unit norm (1/sqrt(hidden))
                normal_(p, ROUTER_LOGIT_STD)
            elif pname.endswith("per_expert_scale"):  # Gemma 4's weight scale per expert: not all one
                normal_(p, 0.3)
                p.add_(1.0)
            elif pname.endswith(ROUTER_SUFFIXES):  # the router's input is normalised: unit scale
                normal_(p, ROUTER_LOGIT_STD / p.shape[-1] ** 0.5)
            elif pname.endswith("embed_tokens.weight") or pname == "transformer.wte.weight":  # transformer.wte: DBRX
                # model. or model.language_model.; Gemma's embedding multiplies its output by sqrt(hidden): the
                # residual stream starts at EMBED_STD
                normal_(p, EMBED_STD / float(getattr(module, "scalar_embed_scale", 1.0)))
            elif pname == "lm_head.weight":  # the final norm gives unit-scale hidden states
                normal_(p, LOGIT_STD / hidden ** 0.5)
            elif p.dim() >= 2:
                normal_(p, p.shape[fan_in_dim] ** -0.5)
            elif pname.endswith(("bias", "sinks")):  # next to unit-scale activations (sinks: attention scores)
                # the correction biases shift router probabilities or sigmoid scores (ernie's moe_statics, afmoe's
                # expert_bias here)
                normal_(p, 0.1 if "correction" in pname or pname.endswith("expert_bias") else 0.5)
            elif p.numel() > 1 and not torch.all(p == p.reshape(-1)[0]):
                # a vector transformers drew at random (MuseSpark's residual gates, DeepSeek-OCR-2's view separator):
                # drawn again from the seed, or the checkpoint would not be a function of it
                normal_(p, 0.5)
            # else a norm weight: stays constant (1, or 0 where the norm adds 1)
        for bname, b in module.named_buffers(prefix=name, recurse=False):
            if bname.endswith(("e_score_correction_bias", "expert_bias")):  # deepseek_v3, glm4_moe, dots1, lfm2_moe:
                # added to sigmoid scores
                normal_(b, 0.1)
    return model.eval()


def save_tiny(arch: str, path, seed: int = 0):
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# arch-b: multimodal top-level types as real checkpoints ship them (a text_config inside), built around the tiny
# language model of ARCHS: top-level type -> (its language model's type, a minimal vision config)
MULTIMODAL = {
    "llama4": ("llama4_text", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                   image_size=28, patch_size=14, vision_output_dim=16, projector_input_dim=16,
                                   projector_output_dim=16)),
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16,
                                             out_hidden_size=COMMON["hidden_size"], patch_size=14)),
}


def save_tiny_multimodal(model_type: str, path, seed: int = 0):
    """A top-level checkpoint (vision tower and all) whose language model has tiny_model(text type)'s weights."""
    from transformers import AutoModelForImageTextToText

    text_type, vision = MULTIMODAL[model_type]
    text = tiny_model(text_type, seed)
    cfg = AutoConfig.for_model(model_type, text_config=text.config.to_dict(), vision_config=vision)
    full = AutoModelForImageTextToText.from_config(cfg)
    language_model = getattr(full, "language_model", None) or full.model.language_model
    if hasattr(language_model, "lm_head"):  # Llama 4: a causal LM inside
        language_model.load_state_dict(text.state_dict())
    else:  # Qwen3.5-MoE: the decoder stack inside, the head beside it
        language_model.load_state_dict({k[len("model."):]: v for k, v in text.state_dict().items()
                                        if k.startswith("model.")})
        full.lm_head.load_state_dict(text.lm_head.state_dict())
    full.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
