"""Layer specs: the one place that chooses Transformer Engine or Megatron's local layers.

``use_transformer_engine`` decides from ``ModelConfig.transformer_impl`` (TE when it is importable
and CUDA is present under "auto"). ``build_layer_spec`` builds the transformer-layer ``ModuleSpec``
used by both the language model and the vision tower from the chosen backend: TE fuses the
pre-attention / pre-MLP norms into the following linear layers (``TELayerNormColumnParallelLinear``)
and supports FP8; the local backend keeps separate norms and maps their checkpoint keys to TE's
names so that checkpoints load under either backend.

The vision tower attends within each image / video frame (Qwen2-VL, and Qwen2.5-VL's full-attention
blocks) or each window (Qwen2.5-VL's other blocks) of one packed sequence. TE's attention does
that for THD-packed inputs; Megatron's local ``DotProductAttention`` rejects packed sequences, so
on the local backend :class:`PackedSDPAttention` plugs in instead (SDPA per segment, segments of
equal length batched together).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.models.config import ModelConfig

# Local norms are renamed to TE's fused-norm names in checkpoints (what Megatron's GPT local spec
# does too), so a checkpoint converted on a CPU machine loads into the TE model on a GPU.
LOCAL_TO_TE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """Whether to build with TE layers; raises when TE is demanded but cannot run here."""
    impl = model_cfg.transformer_impl
    if impl == "local":
        return False
    available = transformer_engine_available() and torch.cuda.is_available()
    if impl == "transformer_engine" and not available:
        raise ConfigError(
            "model.transformer_impl: 'transformer_engine' needs Transformer Engine and CUDA "
            "(use 'auto' or 'local' on this machine)"
        )
    if model_cfg.fp8 is not None and not available:
        raise ConfigError("model.fp8: FP8 needs Transformer Engine and CUDA")
    return available


def _backend(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


class _SDPACoreAttention(MegatronModule):
    """What Megatron's ``Attention`` constructs a core-attention module with, for the
    ``scaled_dot_product_attention`` cores below (local layers only: no context parallelism)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("context parallelism needs Transformer Engine attention")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout


class PackedSDPAttention(_SDPACoreAttention):
    """Bidirectional core attention over packed segments, for the vision tower on local layers.

    Takes what Megatron's ``Attention`` hands a core-attention module. With THD packing
    (``packed_seq_params.qkv_format == "thd"``) query/key/value are [t, heads, head_dim] and
    attention stays inside each ``cu_seqlens_q`` segment; without packing they are
    [s, b, heads, head_dim] and each sequence is one segment. Returns [t, heads * head_dim]
    (or [s, b, heads * head_dim]).
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        assert attention_mask is None and attention_bias is None, "segments are the only mask"
        if packed_seq_params is None:  # [s, b, h, d]: each batch row is one segment
            s, b = query.shape[:2]
            out = self._attend(*(x.permute(1, 2, 0, 3) for x in (query, key, value)))
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)
        assert packed_seq_params.qkv_format == "thd"
        cu = packed_seq_params.cu_seqlens_q.tolist()
        out = torch.empty_like(query)
        lengths = torch.tensor([e - s for s, e in zip(cu[:-1], cu[1:])])
        starts = torch.tensor(cu[:-1])
        for length in lengths.unique().tolist():
            if length == 0:
                continue
            rows = starts[lengths == length][:, None] + torch.arange(length)  # [n_seg, L]
            q, k, v = (x[rows].transpose(1, 2) for x in (query, key, value))  # [n, h, L, d]
            out[rows] = self._attend(q, k, v).transpose(1, 2)
        return out.reshape(out.shape[0], -1)

    def _attend(self, q, k, v):
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )


class CausalSDPAttention(_SDPACoreAttention):
    """Causal decoder core attention through ``scaled_dot_product_attention``, for local layers.

    Same contract as Megatron's local ``DotProductAttention``: query [sq, b, heads, d],
    key/value [sk, b, groups, d] (grouped-query attention without copying K/V); a given
    ``attention_mask`` (bool, True = masked, causality included) is used as is, otherwise the
    mask is causal and aligned to the last key, so a KV-cached decode step attends to the whole
    cache. Returns [sq, b, heads * d]. On CPU this is several times faster per decode step than
    the unfused softmax path, which dominates rollout time there.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        assert attention_bias is None, "no attention bias"
        if packed_seq_params is not None:
            assert attention_mask is None, "packed sequences carry their own (segment) mask"
            return self._attend_packed(query, key, value, packed_seq_params)
        sq, sk = query.size(0), key.size(0)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask.bool()
        elif 1 < sq < sk:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            # Square and unmasked (a full forward): SDPA's causal kernel, no [sq, sk] mask.
            is_causal=mask is None and sq == sk and sq > 1,
            scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=True,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, q.size(0), -1)

    def _attend_packed(self, query, key, value, packed_seq_params: PackedSeqParams):
        """THD-packed rows ([t, heads|groups, d], ``cu_seqlens_q`` segments): causal attention
        inside each segment, i.e. a block-diagonal causal mask applied block by block (segments
        of equal length batched together), so no [t, t] mask is materialised. -> [t, heads*d]."""
        assert packed_seq_params.qkv_format == "thd", packed_seq_params.qkv_format
        cu = packed_seq_params.cu_seqlens_q.tolist()
        if packed_seq_params.cu_seqlens_kv.tolist() != cu:
            raise ValueError("packed attention: query and key segments must be the same")
        starts = torch.tensor(cu[:-1])
        lengths = torch.tensor(cu[1:]) - starts
        out = query.new_empty(query.shape)
        for length in lengths.unique().tolist():
            if length == 0:
                continue
            rows = (starts[lengths == length][:, None] + torch.arange(length)).to(query.device)
            q, k, v = (x[rows].transpose(1, 2) for x in (query, key, value))  # [n, h, L, d]
            out[rows] = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=True,
            ).transpose(1, 2)
        return out.reshape(out.size(0), -1)


def _single_rank_linear(layer) -> bool:
    """Whether a Megatron linear layer's forward reduces to ``x @ W^T (+ b)``: one TP rank, no
    sequence parallelism, no expert communication, no deferred embedding wgrad."""
    group = layer.tp_group
    return (
        (group is None or group.size() == 1)
        and not layer.sequence_parallel
        and not layer.explicit_expert_comm
        and not layer.config.defer_embedding_wgrad_compute
    )


class DirectColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear``; at one TP rank and without autograd (decoding,
    log-prob passes) the forward is its matmul and bias add, without the region mappings and the
    autograd ``Function`` around them: the same ops in the same order, so bit-identical results,
    minus the Python around them, which adds up in a KV-cached decode step of a small model on CPU.
    With gradients enabled, or any parallel setting, Megatron's forward runs unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._direct = _single_rank_linear(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self._direct or torch.is_grad_enabled() or self.config._cpu_offloading_context:
            return super().forward(input_, weight, runtime_gather_output)
        output = torch.matmul(input_, (self.weight if weight is None else weight).t())
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, self.bias if self.skip_bias_add else None


class DirectRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` with the fast path of :class:`DirectColumnParallelLinear`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._direct = _single_rank_linear(self)

    def forward(self, input_):
        if not self._direct or torch.is_grad_enabled() or self.config._cpu_offloading_context:
            return super().forward(input_)
        output = torch.matmul(input_, self.weight.t())
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


def _residual_add(output_with_bias, residual: torch.Tensor) -> torch.Tensor:
    """``bias_dropout_add`` in eval mode (dropout is the identity): (x + bias) + residual."""
    x, bias = output_with_bias
    if bias is not None:
        x = x + bias
    return x + (residual if residual.dtype == x.dtype else residual.to(x.dtype))


class DirectTransformerLayer(TransformerLayer):
    """Megatron's ``TransformerLayer``; without autograd and in eval mode (decoding, log-prob
    passes) the forward is norm, attention, residual, norm, MLP, residual, calling the same
    submodules with the same arguments, without the training machinery around them
    (recompute and offload hooks, NVTX ranges, dropout calls, the ``enable_grad`` scope of the
    bias-dropout-add, ``make_viewless_tensor``): bit-identical outputs with less Python per
    call. With the direct linears this took ~0.4 ms of Python off each decode step of the
    4-layer model of ``tools/bench_generate.py`` (about a fifth of it at hidden size 32).
    Layers with cross-attention, MoE, CUDA graphs or fused TP inference kernels keep Megatron's
    forward.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._direct = (
            isinstance(self.cross_attention, IdentityOp)
            and isinstance(self.pre_cross_attn_layernorm, IdentityOp)
            and not self.is_moe_layer
            and not hasattr(self, "cudagraph_manager")
            and not self.config.inference_fuse_tp_communication
            and self.config.mlp_chunks_for_prefill <= 1
            and not (self.offload_attn_norm or self.offload_mlp_norm)
        )

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        padding_mask=None,
        **kwargs,
    ):
        if not self._direct or self.training or torch.is_grad_enabled() or kwargs:
            return super().forward(
                hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin, attention_bias,
                inference_context, packed_seq_params, sequence_len_offset, padding_mask, **kwargs,
            )  # fmt: skip
        attention_out = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        hidden_states = _residual_add(attention_out, hidden_states)
        mlp_out = self.mlp(self.pre_mlp_layernorm(hidden_states), padding_mask=padding_mask)
        return _residual_add(mlp_out, hidden_states), context


class _RotaryTrig:
    """cos and signed sin of one rotary-embedding tensor, in the activations' dtype, computed
    once for all the layers that are handed that same tensor in one forward (``GPTModel`` passes
    one ``rotary_pos_emb`` to every layer). A one-entry cache keyed by a weak reference to the
    tensor and the dtype: a new forward's embedding is a new tensor and recomputes."""

    def __init__(self):
        self._key = None  # (weakref to freqs, dtype)
        self._trig = None

    def __call__(
        self, freqs: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._key
        if key is None or key[0]() is not freqs or key[1] != dtype:
            half = freqs.size(-1) // 2
            sin = torch.sin(freqs)
            # rotate_half(t) * sin == roll(t, half) * [-sin_first_half, sin_second_half]
            signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            self._trig = (torch.cos(freqs).to(dtype), signed.to(dtype))
            self._key = (weakref.ref(freqs), dtype)
        return self._trig


def _rotate(t: torch.Tensor, trig: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Megatron's unfused, non-interleaved rotary (``_apply_rotary_pos_emb_bshd`` with the
    rotary dim equal to the head dim), bit for bit, in four ops instead of about fifteen:
    t [s, b, heads, d], cos / signed sin [s, b, 1, d] in t's dtype."""
    cos, signed_sin = trig
    return t * cos + t.roll(t.size(-1) // 2, dims=-1) * signed_sin


class RotaryCachedSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` whose static KV cache holds keys *after* rotary embedding.

    Megatron's static-batching path caches keys before rotary and rotates the whole cached
    sequence again in every decode step (and the caller passes position ids for the whole
    sequence so that the embedding covers it): per layer and step O(sequence) work that
    ``transformers`` does not do. Here each step's new keys are rotated once, before they are
    cached, and so is the new query; the caller may pass position ids for the step's tokens
    only (``rollout/generate.py`` does). Embeddings that span the whole sequence are still
    accepted (sliced to the step's rows). cos and sin are computed once per forward for all
    layers (:class:`_RotaryTrig`) where Megatron's unfused rotary is what would run (no fused
    RoPE kernel, not interleaved, full-head rotary); otherwise Megatron's ``apply_rotary_pos_emb``
    rotates. Everything else (training forwards, dynamic contexts, flash decode) goes through
    Megatron's code unchanged. Positions are per token, not per cache column, so copying rotated
    keys between contexts and columns (``rollout/kv_cache.py``) keeps them valid.
    """

    _trig = _RotaryTrig()  # shared by every layer: one forward hands them all the same tensor

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        # Configurations whose static-context forward is qkv, cache, rotary, core, projection
        # (see ``forward``); the others run Megatron's forward.
        self._direct = not (
            cfg.flash_decode
            or cfg.fused_single_qkv_rope
            or cfg.attention_output_gate
            or cfg.no_rope_freq
            or cfg.cuda_graph_impl == "local"
            or self.offload_qkv_linear
            or self.offload_core_attention
            or self.offload_attn_proj
        )

    def forward(
        self,
        hidden_states,
        attention_mask,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        **kwargs,
    ):
        """Megatron's forward, except in a static inference context without autograd (prefill
        and decode steps of ``rollout/generate.py``): there the same steps run (qkv projection,
        the cache write of ``_adjust_key_value_for_inference``, rotary, core attention, output
        projection) through the same methods, without the branches for the other settings."""
        direct = (
            self._direct
            and inference_context is not None
            and inference_context.is_static_batching()
            and not self.training
            and not torch.is_grad_enabled()
            and key_value_states is None
            and packed_seq_params is None
            and rotary_pos_cos is None
            and rotary_pos_sin is None
            and rotary_pos_cos_sin is None
            and not kwargs
        )
        if not direct:
            return super().forward(
                hidden_states, attention_mask, key_value_states, inference_context,
                rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                attention_bias, packed_seq_params, sequence_len_offset, **kwargs,
            )  # fmt: skip
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        query, key, value, rotary_pos_emb, attn_mask_type, _ = (
            self._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, None, None, None,
                sequence_len_offset,
            )
        )  # fmt: skip
        q_pos_emb, k_pos_emb = rotary_pos_emb if rotary_pos_emb is not None else (None, None)
        rotary = dict(
            config=self.config,
            cu_seqlens=None,
            mscale=_yarn_get_concentration_factor_from_config(self.config),
            cp_group=self.pg_collection.cp,
        )
        if q_pos_emb is not None:
            query = apply_rotary_pos_emb(query, q_pos_emb, **rotary)
        if k_pos_emb is not None:
            key = apply_rotary_pos_emb(key, k_pos_emb, **rotary)
        core_out = self.core_attention(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=attn_mask_type,
            attention_bias=attention_bias,
            packed_seq_params=None,
        )
        return self.linear_proj(core_out)

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        static = inference_context is not None and inference_context.is_static_batching()
        if not static or rotary_pos_emb is None or self.config.flash_decode:
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        q_pos_emb, k_pos_emb = rotary_pos_emb  # [s, b, 1, d] each (Attention makes a pair)
        start = inference_context.sequence_len_offset
        if k_pos_emb.size(0) != key.size(0):  # embeddings of the whole sequence
            same = q_pos_emb is k_pos_emb
            k_pos_emb = k_pos_emb[start : start + key.size(0)]
            q_pos_emb = k_pos_emb if same else q_pos_emb[start : start + query.size(0)]
        fast = (
            q_pos_emb is k_pos_emb
            and not self.config.apply_rope_fusion
            and not self.config.rotary_interleaved
            and k_pos_emb.size(-1) == key.size(-1)
        )
        if fast:
            trig = self._trig(k_pos_emb, query.dtype)
            query, key = _rotate(query, trig), _rotate(key, trig)
            rotary_pos_emb = (None, None)  # both rotated here
        else:
            key = apply_rotary_pos_emb(
                key, k_pos_emb, config=self.config, cp_group=self.pg_collection.cp
            )
            rotary_pos_emb = (q_pos_emb, None)  # the query is rotated by Attention.forward
        query, key, value, _, attn_mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs
        )
        return query, key, value, rotary_pos_emb, attn_mask_type, block_table


def _linear_layers(backend, use_te: bool):
    """(column-parallel, row-parallel) linear classes: TE's, or Megatron's local ones with the
    single-rank inference fast path."""
    if use_te:
        return backend.column_parallel_linear(), backend.row_parallel_linear()
    assert backend.column_parallel_linear() is ColumnParallelLinear
    assert backend.row_parallel_linear() is RowParallelLinear
    return DirectColumnParallelLinear, DirectRowParallelLinear


def build_layer_spec(
    use_te: bool, *, rms_norm: bool, vision: bool, fp32: bool = False
) -> ModuleSpec:
    """A transformer layer: norm, self-attention, residual, norm, MLP, residual.

    ``vision`` selects bidirectional attention over packed segments (no causal mask); otherwise
    the layer is a causal decoder layer. Norm kind and MLP shape (gated or not, activation, biases)
    come from the layer's ``TransformerConfig``. ``fp32`` vision layers use
    :class:`PackedSDPAttention` even with TE: TE's fused kernels take 16-bit inputs only.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    backend = _backend(use_te)
    fused_norm = backend.fuse_layernorm_and_linear()
    norm = IdentityOp if fused_norm else backend.layer_norm(rms_norm=rms_norm)
    column_linear, row_linear = _linear_layers(backend, use_te)
    norm_linear = backend.column_parallel_layer_norm_linear() if fused_norm else column_linear
    if vision:
        core_attention = backend.core_attention() if use_te and not fp32 else PackedSDPAttention
        mask_type = AttnMaskType.no_mask
    else:
        core_attention = backend.core_attention() if use_te else CausalSDPAttention
        mask_type = AttnMaskType.causal
    return ModuleSpec(
        module=TransformerLayer if use_te else DirectTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention if vision else RotaryCachedSelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=norm_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=norm_linear, linear_fc2=row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused_norm else dict(LOCAL_TO_TE_KEYS),
        ),
    )


def build_norm_module(use_te: bool, *, rms_norm: bool):
    """A stand-alone norm (the vision merger's ``ln_q``); built as ``cls(config, hidden, eps)``."""
    return _backend(use_te).layer_norm(rms_norm=rms_norm)


def build_mlp_submodules(use_te: bool) -> MLPSubmodules:
    """Column- then row-parallel linear layers (the vision merger's MLP)."""
    column_linear, row_linear = _linear_layers(_backend(use_te), use_te)
    return MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)
