"""A tiny random Qwen2-style Megatron ``GPTModel`` with mRoPE, for rollout tests and benchmarks.

Same language-model layout as Qwen2-VL / Qwen2.5-VL (RMSNorm, SwiGLU MLP, grouped-query
attention with QKV bias, 3-axis multimodal rotary embedding, untied output layer), with Megatron's
local layer spec so it runs on CPU. ``core_attention="sdpa"`` swaps Megatron's local
``DotProductAttention`` for the model's ``CausalSDPAttention`` (same math through
``scaled_dot_product_attention``), to measure what a fused attention buys decoding. Needs the model-parallel groups initialised
(``megatron_vcap.parallel.runtime.init_distributed``); at TP > 1 each rank builds its shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TinyGPTConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    max_sequence_length: int = 512
    # Sums to head_dim / 2 (head_dim 16 here): the (t, h, w) split of the rotary frequencies.
    mrope_section: list[int] = field(default_factory=lambda: [4, 2, 2])
    rotary_base: int = 10000
    norm_epsilon: float = 1e-6
    dtype: torch.dtype = torch.float32
    core_attention: str = "local"  # "local" (Megatron DotProductAttention) or "sdpa"


def build_tiny_mrope_gpt(
    cfg: TinyGPTConfig | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
):
    """Build the model (random init from the current torch seed) in eval mode; at PP > 1 this
    rank's stage (its share of the layers; embedding on the first, output layer on the last)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    cfg = cfg or TinyGPTConfig()
    config = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        add_qkv_bias=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        mrope_section=list(cfg.mrope_section),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        pipeline_dtype=cfg.dtype,
        params_dtype=cfg.dtype,
        bf16=cfg.dtype == torch.bfloat16,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    from megatron_vcap.models.direct_gpt import DirectGPTModel
    from megatron_vcap.models.specs import build_layer_spec

    # The VLM's own decoder layer (rotated keys in the decode cache, single-rank linear fast
    # path, SDPA core attention), so that benchmarks and tests of generation measure the code the
    # model runs; "local" puts Megatron's DotProductAttention back in.
    spec = build_layer_spec(False, rms_norm=True, vision=False)
    if cfg.core_attention == "local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    elif cfg.core_attention != "sdpa":
        raise ValueError(f"core_attention: expected 'local' or 'sdpa', got {cfg.core_attention!r}")
    model = DirectGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        position_embedding_type="mrope",
        rotary_base=cfg.rotary_base,
        share_embeddings_and_output_weights=False,
        pre_process=pipeline_parallel_size == 1 or ps.is_pipeline_first_stage(),
        post_process=pipeline_parallel_size == 1 or ps.is_pipeline_last_stage(),
    )
    return model.eval()
