"""Qwen2-VL / Qwen2.5-VL as one Megatron-Core module: vision tower + GPTModel with mRoPE.

``build_qwen_vl_model`` builds it from a ``transformers`` config for the current parallel layout
(call ``megatron_vcap.parallel.runtime.init_distributed`` first). The vision tower lives on the
first pipeline stage; its merged tokens replace the embeddings of the ``<|image_pad|>`` /
``<|video_pad|>`` tokens before the language model runs. The language model is Megatron's
``GPTModel`` (RMSNorm, SwiGLU, GQA with QKV bias, mRoPE from ``mrope_section``, tied or untied
output layer as the config says).

Shape legend: B batch, S sequence (Sq new tokens, Sk keys incl. the KV cache), H hidden, V vocab.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_vcap.models import specs
from megatron_vcap.models.config import ModelConfig
from megatron_vcap.models.direct_gpt import DirectGPTModel
from megatron_vcap.models.hf_config import QwenVLSpec, describe_hf_config, load_hf_config
from megatron_vcap.models.megatron_config import MegatronConfigs, build_megatron_configs
from megatron_vcap.models.vision import QwenVisionModel

__all__ = ["QwenVLModel", "build_qwen_vl_model", "load_hf_config", "build_attention_mask"]


def _causal_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """[Sq, Sk], True = masked; the queries are the last ``num_queries`` of the keys."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    return torch.arange(num_keys, device=device)[None, :] > query_pos[:, None]


def build_attention_mask(padding_mask_BSk: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Causal + padding mask for Megatron's local attention: [B, 1, Sq, Sk], True = masked.

    The queries are the last ``num_queries`` of the Sk positions (all of them in a full forward,
    the new tokens when decoding with a KV cache).
    """
    causal = _causal_mask(num_queries, padding_mask_BSk.shape[1], padding_mask_BSk.device)
    return causal[None, None] | ~padding_mask_BSk.bool()[:, None, None, :]


def _is_right_padded(padding_mask_BS: torch.Tensor) -> bool:
    mask = padding_mask_BS.bool()
    return bool((mask.cummin(dim=1).values == mask).all())


class QwenVLModel(MegatronModule):
    """Vision tower (first stage) + Megatron GPTModel; see the module docstring."""

    def __init__(
        self,
        spec: QwenVLSpec,
        configs: MegatronConfigs,
        model_cfg: ModelConfig,
        *,
        use_te: bool,
        pre_process: bool,
        post_process: bool,
    ):
        super().__init__(config=configs.language)
        # Megatron's forward-backward schedules read the model type off the outermost module.
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.spec = spec
        self.use_te = use_te
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision = QwenVisionModel(configs, spec, use_te) if pre_process else None
        self.language_model = DirectGPTModel(
            config=configs.language,
            transformer_layer_spec=specs.build_layer_spec(use_te, rms_norm=True, vision=False),
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=spec.rope_theta,
            # Vision tokens are placed into the full sequence first; we scatter afterwards.
            scatter_embedding_sequence_parallel=False,
        )
        if self.vision is not None:
            for name, param in self.vision.named_parameters():
                is_merger = name.startswith("merger.")
                if (model_cfg.freeze_merger and is_merger) or (
                    model_cfg.freeze_vision and not is_merger
                ):
                    param.requires_grad_(False)

    # Megatron's schedules and grad finalisation look these up on the outermost model.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def encode_vision(
        self,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Images and videos in one packed vision pass -> ([n_image_tokens, H], [n_video_tokens, H])."""
        parts = [
            (p, g)
            for p, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
            if p is not None
        ]
        if not parts:
            return None, None
        if any(g is None for _, g in parts):
            raise ValueError("pixel inputs were given without their *_grid_thw")
        merged = self.vision(torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts]))
        unit = self.spec.spatial_merge_size**2
        counts = [int(g.prod(-1).sum()) // unit for _, g in parts]
        chunks = iter(merged.split(counts))
        image = next(chunks) if pixel_values is not None else None
        video = next(chunks) if pixel_values_videos is not None else None
        return image, video

    def _embed(self, input_ids, vision_inputs, in_decode: bool, video_index=None) -> torch.Tensor:
        """Token embeddings with vision tokens placed at their pad tokens: [S, B, H]."""
        embeddings = self.language_model.embed_tokens(input_ids)
        image, video = self.encode_vision(*vision_inputs)
        if video is not None and video_index is not None:
            # Each distinct video was encoded once; repeat its tokens for every use, in order.
            unit = self.spec.spatial_merge_size**2
            per_video = video.split((vision_inputs[3].prod(-1) // unit).tolist())
            video = torch.cat([per_video[i] for i in video_index.tolist()])
        for features, token_id, name in (
            (image, self.spec.image_token_id, "image"),
            (video, self.spec.video_token_id, "video"),
        ):
            where = (input_ids == token_id).nonzero()  # [n, 2] (b, s) in row-major order
            if features is None:
                if len(where) and not in_decode:
                    raise ValueError(
                        f"input_ids hold {len(where)} {name} pad tokens but no "
                        f"{'pixel_values' if name == 'image' else 'pixel_values_videos'} were given"
                    )
                continue
            if len(where) != features.shape[0]:
                raise ValueError(
                    f"{name} pad tokens and {name} features disagree in number: input_ids hold "
                    f"{len(where)} {name} pad tokens, the vision tower produced "
                    f"{features.shape[0]} {name} tokens from the *_grid_thw"
                )
            embeddings = embeddings.index_put(
                (where[:, 1], where[:, 0]), features.to(embeddings.dtype)
            )
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _attention_mask(self, attention_mask, num_queries: int):
        """A padding mask [B, Sk] (1 = real) or a Megatron mask [B, 1, Sq|1, Sk] (True = masked)
        -> what Megatron's attention needs (None when causal attention alone is exact)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() == 4:
            masked = attention_mask.bool()
            if not bool(masked.any()):
                return None
            if self.use_te:
                raise ValueError(
                    "attention_mask: Transformer Engine attention cannot take an arbitrary mask "
                    "(pad on the right, or use model.transformer_impl=local)"
                )
            causal = _causal_mask(num_queries, masked.shape[-1], masked.device)
            return masked | causal[None, None]
        if bool(attention_mask.bool().all()):
            return None  # causal attention needs no mask tensor
        if not self.use_te:
            return build_attention_mask(attention_mask, num_queries)
        if _is_right_padded(attention_mask):
            # Causal attention never lets a real token see the pad tokens after it.
            return None
        raise ValueError(
            "attention_mask: left padding is not supported with Transformer Engine layers "
            "(pad on the right, or use model.transformer_impl=local)"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_context=None,
        runtime_gather_output: bool | None = None,
        video_index: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """input_ids [B, Sq], position_ids [3, B, Sk] (mRoPE), attention_mask [B, Sk] (1 = real
        token; or a Megatron mask [B, 1, Sq|1, Sk], True = masked, to which causality is added).

        Returns logits [B, Sq, V] (vocab-sharded across TP unless ``runtime_gather_output``), the
        per-token loss [B, Sq] when ``labels`` are given, or hidden states on non-last stages.

        ``video_index`` (int [n]): the videos in ``pixel_values_videos`` are distinct and the
        sequence uses video ``video_index[k]`` at its k-th video placeholder, so rows sharing a
        video (the G samples of a GRPO prompt) encode it once; gradients add up over the uses.

        ``packed_seq_params`` (THD, see ``rl/packing.py``): ``input_ids`` [1, N] hold several
        sequences back to back with their own mRoPE ``position_ids`` [3, 1, N]; attention stays
        inside each ``cu_seqlens`` segment; no ``attention_mask`` then.
        """
        decoder_input = None
        if self.pre_process:
            vision_inputs = (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
            decoder_input = self._embed(
                input_ids, vision_inputs, inference_context is not None, video_index
            )
        return self.language_model(
            input_ids,
            position_ids,
            self._attention_mask(attention_mask, input_ids.shape[1]),
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            runtime_gather_output=runtime_gather_output,
            packed_seq_params=packed_seq_params,
        )


def build_qwen_vl_model(
    hf_config,
    model_cfg: ModelConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    sequence_parallel: bool = False,
    init_weights: bool = True,
) -> QwenVLModel:
    """Build this rank's part of the model (TP/PP from ``parallel_state``).

    ``pre_process`` / ``post_process`` default to whether this is the first / last pipeline stage.
    ``init_weights=False`` skips random initialisation when weights are loaded right after.
    """
    from megatron.core import parallel_state as ps

    spec = describe_hf_config(hf_config)
    use_te = specs.use_transformer_engine(model_cfg)
    if sequence_parallel and not use_te:
        raise ValueError("parallel.sequence_parallel: needs Transformer Engine layers (GPU)")
    configs = build_megatron_configs(
        spec, model_cfg, sequence_parallel=sequence_parallel, init_weights=init_weights
    )
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    model = QwenVLModel(
        spec,
        configs,
        model_cfg,
        use_te=use_te,
        pre_process=pre_process,
        post_process=post_process,
    )
    # Local norms are created in fp32 whatever params_dtype says; one dtype for all parameters.
    model.to(configs.language.params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
