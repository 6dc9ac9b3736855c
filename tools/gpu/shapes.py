"""Model shapes for the GPU kit's benchmarks: Qwen2.5-VL-7B's, and tiny ones for the dry run.

Only the layer counts are cut down (the GPU machine lends 15 minutes, not a 7B checkpoint): every
layer has the 7B's widths (hidden 3584, 28 heads, 4 KV heads, FFN 18944, vocab 152064; vision
tower 1280 wide, 16 heads, FFN 3420, 112 px windows, full attention every 8th block).
"""

from __future__ import annotations

QWEN25_VL_7B = dict(
    vocab_size=152064,
    text_hidden_size=3584,
    text_intermediate_size=18944,
    text_num_attention_heads=28,
    text_num_key_value_heads=4,
    text_rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    text_rope_theta=1e6,
    text_max_position_embeddings=32768,
    vision_hidden_size=1280,
    vision_intermediate_size=3420,
    vision_num_heads=16,
    vision_window_size=112,
    vision_tokens_per_second=2,
)
TINY = dict(
    vocab_size=512,
    text_hidden_size=128,
    text_intermediate_size=256,
    text_num_attention_heads=4,
    text_num_key_value_heads=2,
    text_rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_num_heads=2,
    vision_window_size=56,
)
# Bytes of weights + gradients + optimizer state per parameter in bf16 training with Megatron's
# optimizer: bf16 param (2), fp32 main param (4), fp32 main grad (4), Adam moments (8).
TRAIN_BYTES_PER_PARAM = 18


def qwen_vl_config(dry_run: bool, *, layers: int, vision_depth: int):
    """A Qwen2.5-VL ``transformers`` config: the 7B's widths (tiny in the dry run)."""
    from megatron_vcap.models.presets import tiny_hf_config

    base = TINY if dry_run else QWEN25_VL_7B
    full = [i for i in range(vision_depth) if i % 8 == 7] or [vision_depth - 1]
    return tiny_hf_config(
        "qwen2_5_vl",
        **base,
        text_num_hidden_layers=layers,
        vision_depth=vision_depth,
        vision_fullatt_block_indexes=full,
    )


def lm_layer_params(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int) -> int:
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    return qkv + heads * head_dim * hidden + 3 * hidden * ffn


def layers_that_fit(gpu_bytes: float, *, fixed_params: float, per_layer_params: float,
                    share: float = 0.55, cap: int = 12) -> int:  # fmt: skip
    """LM layers whose training state fits in ``share`` of the GPU memory next to ``fixed_params``
    (embeddings, output layer, vision tower); the rest is left to activations."""
    budget = share * gpu_bytes / TRAIN_BYTES_PER_PARAM - fixed_params
    return max(1, min(cap, int(budget // per_layer_params)))
