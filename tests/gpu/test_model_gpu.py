"""GPU checks of QwenVLModel with Transformer Engine layers (skipped without CUDA).

    python -m pytest -m gpu tests/gpu/test_model_gpu.py

* fp32 TE parity: a checkpoint converted with local layers (as on a CPU machine) loads into the
  TE model and reproduces transformers' fp32 logits (TF32 off) within 1e-3;
* bf16 parity: our bf16 TE model is within max(3 x transformers-bf16's own error, 0.05) of the
  fp32 oracle's logits (max abs over real tokens, logits of magnitude ~1-5);
* FP8 (H100 / compute capability >= 8.9): forward and backward with the TE spec and the delayed
  recipe, vision tower included; loss finite, gradients in vision tower and LM, logits close to
  the bf16 model's (cosine similarity > 0.99).

Batches are right-padded: TE's causal attention cannot take a left-padding mask.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_vcap.models.presets import (
    build_tiny_hf_model,
    build_tiny_inputs,
    build_tiny_processor,
    synthetic_frames,
    tiny_hf_config,
)

pytestmark = pytest.mark.gpu
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# Sizes TE's kernels (and FP8's multiples of 16) are happy with.
SIZES = dict(
    text_hidden_size=128,
    text_intermediate_size=256,
    text_num_attention_heads=4,
    text_num_key_value_heads=2,
    text_rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_num_heads=2,
)


@pytest.fixture(scope="module")
def gpu_rank():
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.parallel.runtime import destroy_distributed, init_distributed

    pytest.importorskip("transformer_engine")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(find_free_port())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield init_distributed(ParallelConfig(), seed=0)
    destroy_distributed()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, gpu_rank):
    """A random HF model dir, its converted checkpoint, a right-padded batch, fp32 HF logits."""
    from megatron_vcap.convert.hf_to_mcore import convert_on_this_rank

    config = tiny_hf_config("qwen2_5_vl", **SIZES)
    hf = build_tiny_hf_model(config, seed=1)
    root = tmp_path_factory.mktemp("gpu")
    hf.save_pretrained(root / "hf")
    build_tiny_processor(config).save_pretrained(root / "hf")
    convert_on_this_rank(str(root / "hf"), str(root / "ckpt"), 1, 1, progress=False)
    inputs = build_tiny_inputs(
        build_tiny_processor(config),
        [f"{IMG} and {VID} describe both", f"x {VID} y"],
        images=[synthetic_frames(1, 112, 84, 1)[0]],
        videos=[synthetic_frames(4, 84, 112, 2), synthetic_frames(2, 56, 56, 3)],
        video_fps=[2.0, 1.0],
        padding_side="right",
    )
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    hf = hf.cuda()
    with torch.no_grad():
        ref = hf(**inputs).logits.float()
        ref_bf16 = hf.to(torch.bfloat16)(**inputs).logits.float()
    return config, root, inputs, ref, ref_bf16


def _ours(config, root, dtype: str, fp8=None):
    from megatron_vcap.convert.checkpoint import load_model_checkpoint
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    cfg = ModelConfig(params_dtype=dtype, transformer_impl="transformer_engine", fp8=fp8)
    model = build_qwen_vl_model(config, cfg, init_weights=False)
    load_model_checkpoint(root / "ckpt", model)
    return model


def _forward(model, config, inputs, **kwargs):
    from megatron_vcap.models.mrope import compute_mrope_position_ids

    positions, _ = compute_mrope_position_ids(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
        attention_mask=inputs["attention_mask"],
        hf_config=config,
    )
    return model(
        inputs["input_ids"],
        positions.cuda(),
        inputs["attention_mask"],
        **{k: inputs[k] for k in VISION_KEYS},
        **kwargs,
    )


def test_te_fp32_loads_a_local_checkpoint_and_matches_transformers(reference):
    config, root, inputs, ref, _ = reference
    model = _ours(config, root, "fp32").eval()
    with torch.no_grad():
        logits = _forward(model, config, inputs, runtime_gather_output=True).float()
    real = inputs["attention_mask"].bool()
    assert (logits - ref).abs()[real].max() < 1e-3


def test_bf16_parity_within_stated_tolerance(reference):
    config, root, inputs, ref, ref_bf16 = reference
    model = _ours(config, root, "bf16").eval()
    with torch.no_grad():
        logits = _forward(model, config, inputs, runtime_gather_output=True).float()
    real = inputs["attention_mask"].bool()
    ours_err = (logits - ref).abs()[real].max().item()
    hf_err = (ref_bf16 - ref).abs()[real].max().item()
    assert ours_err <= max(3 * hf_err, 0.05), (ours_err, hf_err)


def test_fp8_forward_backward_with_te(reference):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (H100)")
    config, root, inputs, _, _ = reference
    # FP8 GEMMs need the LM's token count (B x S) divisible by 16.
    seq = inputs["input_ids"].shape[1]
    extra = (-seq) % 16
    if extra:
        pad_id = build_tiny_processor(config).tokenizer.pad_token_id
        inputs = dict(inputs)
        inputs["input_ids"] = torch.nn.functional.pad(inputs["input_ids"], (0, extra), value=pad_id)
        inputs["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, extra))
    labels = torch.roll(inputs["input_ids"], -1, dims=1)

    bf16 = _ours(config, root, "bf16").eval()
    with torch.no_grad():
        ref = _forward(bf16, config, inputs, runtime_gather_output=True).float()
    model = _ours(config, root, "bf16", fp8="hybrid").train()
    loss = _forward(model, config, inputs, labels=labels)
    (loss.float() * inputs["attention_mask"]).sum().backward()
    assert torch.isfinite(loss).all()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("vision.blocks.") for n in grads)
    assert any(n.startswith("language_model.decoder.") for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.eval()
    with torch.no_grad():
        logits = _forward(model, config, inputs, runtime_gather_output=True).float()
    real = inputs["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(logits[real], ref[real], dim=-1)
    assert cos.min() > 0.99
