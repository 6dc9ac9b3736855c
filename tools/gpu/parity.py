"""Kit section ``parity``: our Megatron Qwen2.5-VL logits against ``transformers`` on this device.

A random Qwen2.5-VL model (every weight random, norms and biases included) is saved as an HF
directory; ``transformers`` runs it in fp32 (TF32 off) as the oracle and in bf16 as the yardstick
of bf16 error. Our model loads the same safetensors through the converter (``load_hf_weights``,
layers chosen by ``model.transformer_impl=auto``: TE where installed, else local) and runs in
fp32 and bf16 on a right-padded batch holding an image and two videos. Tolerances (max absolute
logit error over real tokens, scale = max(1, max |oracle logit|)):

* fp32: <= 1e-3 x scale;
* bf16: <= max(3 x transformers-bf16's own error, 0.05 x scale).
"""

from __future__ import annotations

import torch

from tools.gpu.common import SectionContext, SectionResult, device, init_single_rank

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
DRY = dict(
    vocab_size=256,
    text_hidden_size=128,
    text_intermediate_size=256,
    text_num_attention_heads=4,
    text_num_key_value_heads=2,
    text_rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_num_heads=2,
)
GPU = dict(
    vocab_size=4096,
    text_hidden_size=1024,
    text_intermediate_size=2816,
    text_num_hidden_layers=4,
    text_num_attention_heads=16,
    text_num_key_value_heads=4,
    text_rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
    vision_depth=4,
    vision_hidden_size=256,
    vision_intermediate_size=512,
    vision_num_heads=4,
    vision_fullatt_block_indexes=[1, 3],
)


def build_inputs(processor, dry_run: bool):
    from megatron_vcap.models.presets import build_tiny_inputs, synthetic_frames

    side = 1 if dry_run else 2  # frame sizes x2 on GPU: several windows per frame
    return build_tiny_inputs(
        processor,
        [f"{IMG} and {VID} describe both", f"x {VID} y"],
        images=[synthetic_frames(1, 112 * side, 84 * side, 1)[0]],
        videos=[synthetic_frames(4, 84 * side, 112 * side, 2), synthetic_frames(2, 56, 56, 3)],
        video_fps=[2.0, 1.0],
        padding_side="right",
    )


def forward_ours(model, hf_config, inputs) -> torch.Tensor:
    """Full-vocabulary logits [B, S, V] of our model on a processor batch."""
    from megatron_vcap.models.mrope import compute_mrope_position_ids

    cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
    positions, _ = compute_mrope_position_ids(
        cpu["input_ids"],
        image_grid_thw=cpu.get("image_grid_thw"),
        video_grid_thw=cpu.get("video_grid_thw"),
        second_per_grid_ts=cpu.get("second_per_grid_ts"),
        attention_mask=cpu["attention_mask"],
        hf_config=hf_config,
    )
    dev = inputs["input_ids"].device
    vision = {k: inputs[k] for k in VISION_KEYS if inputs.get(k) is not None}
    with torch.no_grad():
        return model(
            inputs["input_ids"],
            positions.to(dev),
            inputs["attention_mask"],
            runtime_gather_output=True,
            **vision,
        ).float()


def build_ours(hf_config, hf_dir, dtype: str):
    from megatron_vcap.convert.checkpoint import load_hf_weights
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    cfg = ModelConfig(params_dtype=dtype, transformer_impl="auto")
    model = build_qwen_vl_model(hf_config, cfg, init_weights=False)
    load_hf_weights(model, hf_dir)
    return model.eval()


def logit_errors(logits, ref, real) -> dict[str, float]:
    diff = (logits - ref).abs()[real]
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "top1_agree": (logits.argmax(-1) == ref.argmax(-1))[real].float().mean().item(),
    }


def run(ctx: SectionContext) -> SectionResult:
    from megatron_vcap.models.presets import (
        build_tiny_hf_model,
        build_tiny_processor,
        tiny_hf_config,
    )
    from megatron_vcap.models.specs import use_transformer_engine

    res = SectionResult()
    init_single_rank()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = device()
    sizes = DRY if ctx.dry_run else GPU
    config = tiny_hf_config("qwen2_5_vl", **sizes)
    hf_dir = ctx.work_dir / "hf"
    hf = build_tiny_hf_model(config, seed=1)
    hf.save_pretrained(hf_dir)
    processor = build_tiny_processor(config, max_pixels=224 * 224)
    inputs = build_inputs(processor, ctx.dry_run)
    inputs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items()}
    real = inputs["attention_mask"].bool()
    hf = hf.to(dev)
    with torch.no_grad():
        ref = hf(**inputs).logits.float()
        ref_bf16 = hf.to(torch.bfloat16)(**inputs).logits.float()
    del hf
    from megatron_vcap.models.config import ModelConfig

    res.figures.update(
        device=str(dev),
        transformer_engine=use_transformer_engine(ModelConfig(transformer_impl="auto")),
        tokens=int(real.sum()),
        hidden=config.text_config.hidden_size,
        layers=config.text_config.num_hidden_layers,
        vision_depth=config.vision_config.depth,
        max_abs_oracle_logit=ref[real].abs().max().item(),
    )
    scale = max(1.0, res.figures["max_abs_oracle_logit"])
    hf_err = logit_errors(ref_bf16, ref, real)
    res.figures["transformers_bf16_vs_fp32"] = hf_err
    for dtype in ("fp32", "bf16"):
        model = build_ours(config, hf_dir, dtype)
        err = logit_errors(forward_ours(model, config, inputs), ref, real)
        res.figures[f"ours_{dtype}_vs_fp32"] = err
        del model
        if dtype == "fp32":
            bound = 1e-3 * scale
        else:
            bound = max(3 * hf_err["max_abs"], 0.05 * scale)
        res.check(f"{dtype} max abs logit error", err["max_abs"] <= bound,
                  f"<= {bound:.3g}", value=err["max_abs"], bound=bound)  # fmt: skip
    return res
