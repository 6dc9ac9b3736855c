"""The one adapter from (HF description, ModelConfig, parallel layout) to Megatron TransformerConfigs.

Three configs come out: the language model's, the vision tower's and the patch merger's. Tensor
and pipeline sizes are read from Megatron's ``parallel_state`` (set up by
``megatron_vcap.parallel.runtime.init_distributed``); the vision tower and merger live on the first
pipeline stage only, so their configs carry no pipeline split.

Numerics choices: fused kernels that need apex / TE or cannot express mRoPE (RoPE fusion does not
support mRoPE with batch > 1, nor the vision tower's per-token 2D rotary in packed sequences) are
off; dropout is 0 as in Qwen-VL.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vcap.models.config import ModelConfig
from megatron_vcap.models.hf_config import QwenVLSpec, check_parallel_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VISION_NORM_EPS = 1e-6  # hard-coded in the HF vision blocks and merger


@dataclasses.dataclass(frozen=True)
class MegatronConfigs:
    language: TransformerConfig
    vision: TransformerConfig
    merger: TransformerConfig


def _common_kwargs(model_cfg: ModelConfig, *, tp: int, init_weights: bool) -> dict:
    dtype = DTYPES[model_cfg.params_dtype]
    kwargs = dict(
        tensor_model_parallel_size=tp,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=init_weights,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if model_cfg.recompute == "full":
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif model_cfg.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    return kwargs


def _fp8_kwargs(model_cfg: ModelConfig) -> dict:
    if model_cfg.fp8 is None:
        return {}
    return dict(
        fp8=model_cfg.fp8,
        fp8_recipe=model_cfg.fp8_recipe,
        fp8_amax_history_len=model_cfg.fp8_amax_history_len,
        fp8_amax_compute_algo="max",
    )


def build_megatron_configs(
    spec: QwenVLSpec,
    model_cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    init_weights: bool = True,
) -> MegatronConfigs:
    """Language, vision and merger ``TransformerConfig`` for the current parallel layout."""
    from megatron.core import parallel_state as ps

    model_cfg.validate()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_parallel_layout(spec, tp, pp)
    common = _common_kwargs(model_cfg, tp=tp, init_weights=init_weights)
    language = TransformerConfig(
        **common,
        **_fp8_kwargs(model_cfg),
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        mrope_section=list(spec.mrope_section),
    )
    qwen25 = spec.arch == "qwen2_5_vl"
    vision_kwargs = dict(
        common,
        **_fp8_kwargs(model_cfg),
        pipeline_model_parallel_size=1,
        num_attention_heads=spec.vision_num_heads,
        normalization="RMSNorm" if qwen25 else "LayerNorm",
        layernorm_epsilon=VISION_NORM_EPS,
        add_bias_linear=True,
        add_qkv_bias=True,
    )
    vision = TransformerConfig(
        **vision_kwargs,
        num_layers=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        ffn_hidden_size=spec.vision_ffn_hidden_size,
        num_query_groups=spec.vision_num_heads,
        kv_channels=spec.vision_head_dim,
        gated_linear_unit=qwen25,
        activation_func=F.silu if qwen25 else quick_gelu,
    )
    # The merger is an MLP from the 2x2-merged vision features to the LM width (exact GELU).
    merger = TransformerConfig(
        **vision_kwargs,
        num_layers=1,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.merger_hidden_size,
        kv_channels=spec.vision_head_dim,
        gated_linear_unit=False,
        activation_func=F.gelu,
    )
    return MegatronConfigs(language=language, vision=vision, merger=merger)
