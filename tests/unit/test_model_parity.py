"""QwenVLModel against the transformers implementation (the oracle) at TP=1, on CPU in fp32.

Tiny random models are built from configs here; weights get random values everywhere (norms and
biases too) and go through the conversion table into our model. Batches come from the real HF
processor: text only, several images of different sizes, videos sampled at several frame rates
and mixed batches, with left or right padding. Logits are compared at real tokens.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vcap.models.presets import (
    build_tiny_hf_model,
    build_tiny_inputs,
    build_tiny_processor,
    synthetic_frames,
    tiny_hf_config,
)

TOL = 1e-4
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
ARCHS = ["qwen2_vl", "qwen2_5_vl"]


class Pair:
    """A random HF model, its processor, and our model with the same weights."""

    def __init__(self, arch: str, tmp_path_factory, **model_cfg):
        from megatron_vcap.convert.checkpoint import load_hf_weights
        from megatron_vcap.models.config import ModelConfig
        from megatron_vcap.models.qwen_vl import build_qwen_vl_model

        self.config = tiny_hf_config(arch)
        self.hf = build_tiny_hf_model(self.config, seed=1)
        self.processor = build_tiny_processor(self.config)
        hf_dir = tmp_path_factory.mktemp(f"hf_{arch}")
        self.hf.save_pretrained(hf_dir)
        cfg = ModelConfig(params_dtype="fp32", transformer_impl="local", **model_cfg)
        self.ours = build_qwen_vl_model(self.config, cfg)
        load_hf_weights(self.ours, hf_dir)
        self.ours.eval()

    def hf_positions(self, inputs):
        kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
        if self.config.model_type == "qwen2_5_vl" and "second_per_grid_ts" in inputs:
            kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        return self.hf.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            attention_mask=inputs["attention_mask"],
            **kwargs,
        )

    def our_positions(self, inputs):
        from megatron_vcap.models.mrope import compute_mrope_position_ids

        return compute_mrope_position_ids(
            inputs["input_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=inputs["attention_mask"],
            hf_config=self.config,
        )

    def logits(self, inputs):
        pixels = {
            k: inputs[k]
            for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
            if k in inputs
        }
        with torch.no_grad():
            hf_pos, _ = self.hf_positions(inputs)
            ref = self.hf(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                position_ids=hf_pos,
                **pixels,
            ).logits
            pos, _ = self.our_positions(inputs)
            ours = self.ours(inputs["input_ids"], pos, inputs["attention_mask"], **pixels)
        return ref, ours


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, single_rank, tmp_path_factory):
    return Pair(request.param, tmp_path_factory)


def _batch(pair: Pair, case: str, padding_side: str = "left"):
    p = pair.processor
    if case == "text":
        return build_tiny_inputs(
            p, ["hello there", "a much longer second line"], padding_side=padding_side
        )
    if case == "images":  # two sizes, two images in one row
        images = [
            synthetic_frames(1, 56, 84, 1)[0],
            synthetic_frames(1, 84, 56, 2)[0],
            synthetic_frames(1, 112, 112, 3)[0],
        ]
        return build_tiny_inputs(
            p,
            [f"one {IMG} two {IMG} end", f"{IMG} what is it?"],
            images=images,
            padding_side=padding_side,
        )
    if case.startswith("video"):
        fps = float(case.split("@")[1])
        videos = [synthetic_frames(6, 84, 112, 4), synthetic_frames(4, 56, 56, 5)]
        return build_tiny_inputs(
            p,
            [f"clip {VID} describe", f"{VID} short"],
            videos=videos,
            video_fps=[fps, 2 * fps],
            padding_side=padding_side,
        )
    assert case == "mixed"
    return build_tiny_inputs(
        p,
        [f"{IMG} then {VID} done", "just text", f"x {VID} y {IMG}"],
        images=[synthetic_frames(1, 56, 56, 6)[0], synthetic_frames(1, 84, 112, 7)[0]],
        videos=[synthetic_frames(4, 84, 84, 8), synthetic_frames(2, 56, 112, 9)],
        video_fps=[1.0, 3.0],
        padding_side=padding_side,
    )


CASES = ["text", "images", "video@0.5", "video@1", "video@3", "mixed"]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(pair, case):
    inputs = _batch(pair, case)
    ref, ours = pair.logits(inputs)
    real = inputs["attention_mask"].bool()
    assert ours.shape == ref.shape
    diff = (ref - ours).abs()[real]
    assert diff.max() < TOL, f"{pair.config.model_type} {case}: max abs diff {diff.max():.2e}"
    assert ref.abs()[real].max() > 0.1  # the comparison is not between near-zero logits


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", ["images", "video@1", "video@3", "mixed", "text"])
def test_mrope_positions_match_get_rope_index(pair, case, padding_side):
    inputs = _batch(pair, case, padding_side)
    ref, ref_deltas = pair.hf_positions(inputs)
    ours, deltas = pair.our_positions(inputs)
    assert torch.equal(ours, ref)
    # HF counts real tokens only; ours continues from the padded length (see compute_mrope_...).
    pads = (inputs["attention_mask"] == 0).sum(-1)
    assert torch.equal(deltas + pads, ref_deltas.flatten())


@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 3.0, 24.0])
def test_temporal_positions_follow_the_sampling_fps(pair, fps):
    """Qwen2.5-VL: second_per_grid_ts is 2 / fps and the temporal ids step by
    tokens_per_second * 2 / fps (guards the transformers trap: without video_metadata the
    processor assumes 24 fps). Qwen2-VL has no absolute time: one id per grid step at any fps."""
    inputs = _batch(pair, f"video@{fps}")
    positions, _ = pair.our_positions(inputs)
    video = inputs["input_ids"][0] == pair.config.video_token_id
    temporal = positions[0, 0][video].unique()
    start = int(temporal[0])
    if pair.config.model_type == "qwen2_vl":
        assert temporal.tolist() == [start, start + 1, start + 2]
        return
    assert torch.allclose(inputs["second_per_grid_ts"], torch.tensor([2 / fps, 1 / fps]))
    expected = [start + int(i * 4 * (2 / fps)) for i in range(3)]  # tokens_per_second = 4
    assert temporal.tolist() == sorted(set(expected))


def test_pad_token_feature_mismatch_is_a_clear_error(pair):
    inputs = _batch(pair, "images")
    ids = inputs["input_ids"].clone()
    ids[ids == pair.config.image_token_id] = 5  # drop all image pad tokens from the text
    ids[0, -1] = pair.config.image_token_id  # and keep just one
    pos = torch.zeros(3, *ids.shape, dtype=torch.long)
    with pytest.raises(ValueError, match="image pad tokens and image features disagree"):
        pair.ours(
            ids, pos, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
    with pytest.raises(ValueError, match="image pad tokens"):
        pair.ours(inputs["input_ids"], pos)  # pad tokens but no pixels
    from megatron_vcap.models.mrope import compute_mrope_position_ids

    with pytest.raises(ValueError, match="image_grid_thw"):
        compute_mrope_position_ids(
            ids, image_grid_thw=inputs["image_grid_thw"], hf_config=pair.config
        )


def test_vision_geometry_matches_transformers(pair):
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    from megatron_vcap.models.vision import (
        compute_frame_cu_seqlens,
        compute_patch_hw,
        compute_window_index,
    )

    grids = torch.tensor([[1, 4, 6], [3, 8, 4], [2, 10, 14], [1, 16, 16]])
    assert torch.equal(compute_patch_hw(grids, 2), get_vision_position_ids(grids, 2))
    assert torch.equal(compute_frame_cu_seqlens(grids), get_vision_cu_seqlens(grids))
    for window_px in (56, 112):
        index, cu = compute_window_index(grids, 2, window_px // 2 // 14)
        ref_index, ref_cu = get_vision_window_index(grids, 2, window_px, 14)
        assert torch.equal(index, ref_index) and torch.equal(cu, ref_cu)


def test_kv_cached_decoding_matches_full_forward(pair):
    """Prefill with the pixels, then decode token by token: logits equal the full forward's."""
    from megatron.core.inference.contexts import StaticInferenceContext

    inputs = _batch(pair, "mixed")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = {
        k: inputs[k]
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    }
    pos, deltas = pair.our_positions(inputs)
    steps, (batch, prompt_len) = 3, ids.shape
    new = torch.randint(0, 90, (batch, steps), generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    decode_pos = torch.arange(prompt_len, prompt_len + steps)[None, :] + deltas[:, None]
    full_pos = torch.cat([pos, decode_pos.expand(3, -1, -1)], dim=2)
    with torch.no_grad():
        full = pair.ours(full_ids, full_pos, full_mask, **pixels)
        context = StaticInferenceContext(batch, prompt_len + steps)
        context.materialize_only_last_token_logits = False  # compare the prompt's logits too
        cached = [
            pair.ours(
                ids, pos, mask, inference_context=context, runtime_gather_output=True, **pixels
            )
        ]
        for i in range(steps):
            context.sequence_len_offset = prompt_len + i
            end = prompt_len + i + 1
            cached.append(
                pair.ours(
                    full_ids[:, end - 1 : end],
                    full_pos[:, :, :end],
                    full_mask[:, :end],
                    inference_context=context,
                    runtime_gather_output=True,
                )
            )
    cached = torch.cat(cached, dim=1)
    real = full_mask.bool()
    assert (cached - full).abs()[real].max() < 1e-5


def _grad_norms(model, prefix: str) -> list[float]:
    return [
        float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for n, p in model.named_parameters()
        if n.startswith(prefix)
    ]


@pytest.mark.parametrize("freeze", ["none", "vision", "vision+merger"])
def test_backward_reaches_vision_and_language_model(single_rank, tmp_path_factory, freeze):
    pair = Pair(
        "qwen2_5_vl",
        tmp_path_factory,
        freeze_vision=freeze != "none",
        freeze_merger=freeze == "vision+merger",
    )
    model = pair.ours.train()
    inputs = _batch(pair, "mixed")
    pos, _ = pair.our_positions(inputs)
    labels = torch.roll(inputs["input_ids"], -1, dims=1)
    loss = model(
        inputs["input_ids"],
        pos,
        inputs["attention_mask"],
        labels=labels,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        pixel_values_videos=inputs["pixel_values_videos"],
        video_grid_thw=inputs["video_grid_thw"],
    )
    assert loss.shape == inputs["input_ids"].shape
    (loss * inputs["attention_mask"]).sum().backward()
    lm = _grad_norms(model, "language_model.")
    tower = _grad_norms(model, "vision.blocks.") + _grad_norms(model, "vision.patch_embed.")
    merger = _grad_norms(model, "vision.merger.")
    assert all(g > 0 for g in lm)
    if freeze == "none":
        assert all(g > 0 for g in tower + merger)
    else:
        assert all(g == 0 for g in tower)
        assert not any(
            p.requires_grad
            for n, p in model.named_parameters()
            if n.startswith(("vision.blocks.", "vision.patch_embed."))
        )
        assert all((g == 0) == (freeze == "vision+merger") for g in merger)


def test_fp8_row_padding_leaves_vision_outputs_unchanged(pair):
    """With FP8 the packed patches are padded to a multiple of 64 rows (their own segment)."""
    inputs = _batch(pair, "mixed")
    pixels = torch.cat([inputs["pixel_values"], inputs["pixel_values_videos"]])
    grids = torch.cat([inputs["image_grid_thw"], inputs["video_grid_thw"]])
    assert pixels.shape[0] % 64 != 0
    vision = pair.ours.vision
    with torch.no_grad():
        plain = vision(pixels, grids)
        vision.pad_multiple = 64
        try:
            padded = vision(pixels, grids)
        finally:
            vision.pad_multiple = 1
    assert padded.shape == plain.shape
    assert (padded - plain).abs().max() < 1e-6
