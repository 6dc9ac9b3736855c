"""Megatron's ``GPTModel`` with a streamlined forward for KV-cached decoding on one TP rank.

A decode step of a small model on CPU is mostly Python: ``GPTModel.forward`` runs
``_preprocess`` (the embedding through ``VocabParallelEmbedding`` and an identity autograd
``Function``, ~15 ops of ``MultimodalRotaryEmbedding``), the ``TransformerBlock`` (viewless
tensors, RNG and quantisation contexts) and ``_postprocess`` (the output layer through another
autograd ``Function``). :class:`DirectGPTModel` runs the same arithmetic in a static inference
context without autograd: embedding lookup, the mRoPE table in four ops, each layer with the
block's arguments, the final norm, the last position's logits by one matmul. Every value is
bit-identical to Megatron's forward (``tests/unit/test_direct_layers.py`` compares them with the
fast path on and off); any other call, or a model using a setting this path does not reproduce
(tensor or sequence parallelism, FP8/FP4, MTP, flash decode, CUDA graphs, offloading, position
embeddings other than mRoPE), runs Megatron's forward unchanged.

Shape legend: B = batch rows, S = tokens of the call, C = rotary channels (the head dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel


def _mrope_channels(mrope_section: list[int], device) -> torch.Tensor:
    """For each of the C = 2 * sum(mrope_section) rotary channels, the position axis (0 = t,
    1 = h, 2 = w) it reads: Megatron's ``MultimodalRotaryEmbedding`` doubles the frequencies
    and takes section i of the doubled list from axis i % 3."""
    axes = [i % 3 for i, size in enumerate(list(mrope_section) * 2) for _ in range(size)]
    return torch.tensor(axes, dtype=torch.long, device=device)


class DirectGPTModel(GPTModel):
    """``GPTModel``; see the module docstring for the fast path and when it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        rope = getattr(self, "rotary_pos_emb", None)
        tp_group = getattr(self.pg_collection, "tp", None)
        self._direct = (
            self.position_embedding_type == "mrope"
            and (tp_group is None or tp_group.size() == 1)
            and not cfg.sequence_parallel
            and not cfg.multi_latent_attention
            and not cfg.flash_decode
            and not cfg.fp8
            and not cfg.fp4
            and not cfg.fp32_residual_connection
            and cfg.mtp_num_layers is None
            and cfg.cuda_graph_impl != "local"
            and not cfg.fine_grained_activation_offloading
            and not cfg.cpu_offloading
            and rope is not None
            and rope.seq_len_interpolation_factor is None
            and not rope.rotary_interleaved
            and (not self.pre_process or self._plain_embedding())
            and (not self.post_process or self.output_layer.bias is None)
        )
        self._channels = None  # (device, axis_C, inv_freq_C), built on first use

    def _plain_embedding(self) -> bool:
        emb = self.embedding
        return (
            not emb.add_position_embedding
            and emb.tokentype_embeddings is None
            and not emb.reduce_scatter_embeddings
            and not emb.word_embeddings.deterministic_mode
        )

    def _fast(self, inference_context, labels, packed_seq_params, extra_block_kwargs) -> bool:
        return (
            self._direct
            and isinstance(inference_context, StaticInferenceContext)
            and inference_context.materialize_only_last_token_logits
            and not self.training
            and not torch.is_grad_enabled()
            and labels is None
            and packed_seq_params is None
            and not extra_block_kwargs
        )

    def embed_tokens(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """``self.embedding(input_ids)``: [S, B, H]; one lookup where the fast path applies."""
        if self._direct and not self.training and not torch.is_grad_enabled():
            weight = self.embedding.word_embeddings.weight
            return F.embedding(input_ids_BS, weight).transpose(0, 1).contiguous()
        return self.embedding(input_ids=input_ids_BS, position_ids=None)

    def mrope_embedding(self, position_ids_3BS: torch.Tensor) -> torch.Tensor:
        """``self.rotary_pos_emb(position_ids, self.mrope_section)`` bit for bit: [S, B, 1, C].

        Megatron's product of inverse frequency and position is a matmul with an inner size of
        one, i.e. the same single float32 multiply as here."""
        rope = self.rotary_pos_emb
        device = rope.inv_freq.device
        if self._channels is None or self._channels[0] != device:
            axis_C = _mrope_channels(self.mrope_section, device)
            inv_freq_C = torch.cat((rope.inv_freq, rope.inv_freq)).float()
            self._channels = (device, axis_C, inv_freq_C)
        _, axis_C, inv_freq_C = self._channels
        positions_SBC = position_ids_3BS.to(device, rope.inv_freq.dtype).permute(2, 1, 0)
        return (positions_SBC.float()[..., axis_C] * inv_freq_C).unsqueeze(2)

    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        decoder_input=None,
        labels=None,
        inference_context=None,
        packed_seq_params=None,
        extra_block_kwargs=None,
        runtime_gather_output=None,
        **kwargs,
    ):
        if kwargs or not self._fast(
            inference_context, labels, packed_seq_params, extra_block_kwargs
        ):
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input, labels,
                inference_context, packed_seq_params, extra_block_kwargs, runtime_gather_output,
                **kwargs,
            )  # fmt: skip
        if self.pre_process:
            hidden = self.embed_tokens(input_ids) if decoder_input is None else decoder_input
        else:
            hidden = self.decoder.input_tensor
        rotary_pos_emb = self.mrope_embedding(position_ids)
        for layer in self.decoder.layers:
            hidden, _ = layer(
                hidden_states=hidden,
                attention_mask=attention_mask,
                context=None,
                context_mask=None,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=None,
                rotary_pos_sin=None,
                rotary_pos_cos_sin=None,
                attention_bias=None,
                inference_context=inference_context,
                packed_seq_params=None,
                sequence_len_offset=None,
                padding_mask=None,
            )
        if self.decoder.final_layernorm is not None:
            hidden = self.decoder.final_layernorm(hidden)
        if not self.post_process:
            return hidden
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        logits_1BV = torch.matmul(hidden[-1:], weight.t())  # static context: last position only
        return logits_1BV.transpose(0, 1).contiguous()
