"""QwenVLModel at TP=2, PP=2 and TP=2 x PP=2 against transformers, plus checkpoint resharding.

One 4-rank gloo run re-initialises the model-parallel groups for each layout, loads the HF
weights through the conversion table (each rank reading only its shard), runs Megatron's own
pipeline schedule forward-only on a mixed batch (images, videos at two frame rates, left padding)
and compares the gathered logits with the transformers model's, computed in the parent process.
The TP=2 x PP=2 model is then saved as a dist checkpoint and loaded at TP=1 (DP=4).
Qwen2.5-VL runs untied; Qwen2-VL runs with tied embeddings (as its 2B model), which exercises the
embedding shared across pipeline stages.
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
from megatron_vcap.parallel.multiprocess import run_on_ranks

TOL = 1e-4
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (tp, pp); DP fills the 4 ranks
ARCHS = {"qwen2_5_vl": {}, "qwen2_vl": {"tie_word_embeddings": True}}
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _reference(arch: str, hf_dir):
    """Write the HF model dir; return (inputs, mRoPE positions, HF logits, real-token mask)."""
    config = tiny_hf_config(arch, text_num_hidden_layers=4, **ARCHS[arch])
    hf = build_tiny_hf_model(config, seed=2)
    hf.save_pretrained(hf_dir)
    inputs = build_tiny_inputs(
        build_tiny_processor(config),
        [f"{IMG} then {VID} done", f"x {VID} y", "text only row"],
        images=[synthetic_frames(1, 56, 84, 1)[0]],
        videos=[synthetic_frames(4, 84, 56, 2), synthetic_frames(6, 56, 56, 3)],
        video_fps=[1.0, 3.0],
    )
    from megatron_vcap.models.mrope import compute_mrope_position_ids

    positions, _ = compute_mrope_position_ids(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
        hf_config=config,
    )
    with torch.no_grad():
        logits = hf(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=positions,
            **{k: inputs[k] for k in VISION_KEYS},
        ).logits
    assert logits.abs().max() > 0.1  # a comparison of near-zero logits would prove nothing
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", *VISION_KEYS)}
    return batch, positions, logits, inputs["attention_mask"].bool()


def _init(tp: int, pp: int):
    from megatron.core import parallel_state as ps

    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.runtime import init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    return init_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=7
    )


def _forward(model, ctx, batch, positions):
    """Megatron's schedule, forward only; full logits on every rank (from the last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        out = model(
            data["input_ids"],
            positions,
            data["attention_mask"],
            runtime_gather_output=True,
            **{k: data[k] for k in VISION_KEYS},
        )

        def loss_func(output):
            captured.append(output.detach())
            return output.sum() * 0, {}

        return out, loss_func

    seq = batch["input_ids"].shape[1]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch["input_ids"].shape[0],
        forward_only=True,
    )
    gathered = [None] * ctx.pp_size
    torch.distributed.all_gather_object(
        gathered, captured[0] if captured else None, group=ctx.pp_group
    )
    return next(x for x in gathered if x is not None)


def _build(hf_dir, load_from=None):
    from megatron_vcap.convert.checkpoint import load_hf_weights, load_model_checkpoint
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    cfg = ModelConfig(params_dtype="fp32", transformer_impl="local")
    model = build_qwen_vl_model(load_hf_config(hf_dir), cfg, init_weights=False)
    if load_from is None:
        load_hf_weights(model, hf_dir)
    else:
        load_model_checkpoint(load_from, model)
    return model.eval()


def _check_layouts(cases: dict) -> dict:
    """Per arch and layout: max abs logit difference to transformers at real tokens."""
    from megatron_vcap.convert.checkpoint import save_model_checkpoint

    diffs = {}
    for arch, (hf_dir, ckpt_dir, batch, positions, ref, real) in cases.items():
        for tp, pp in LAYOUTS:
            ctx = _init(tp, pp)
            model = _build(hf_dir)
            logits = _forward(model, ctx, batch, positions)
            diffs[(arch, tp, pp)] = float((logits - ref).abs()[real].max())
            if (tp, pp) == (2, 2):
                save_model_checkpoint(ckpt_dir, model, hf_dir)
                saved = logits
        ctx = _init(1, 1)
        logits = _forward(_build(hf_dir, load_from=ckpt_dir), ctx, batch, positions)
        diffs[(arch, "ckpt tp2pp2 -> tp1")] = float((logits - ref).abs()[real].max())
        diffs[(arch, "ckpt vs saving model")] = float((logits - saved).abs()[real].max())
    return diffs


@pytest.mark.timeout(900)
def test_tp_pp_layouts_match_transformers(tmp_path):
    cases = {}
    for arch in ARCHS:
        hf_dir = tmp_path / arch
        batch, positions, ref, real = _reference(arch, hf_dir)
        cases[arch] = (str(hf_dir), str(tmp_path / f"{arch}_ckpt"), batch, positions, ref, real)
    per_rank = run_on_ranks(_check_layouts, 4, cases)
    for rank, diffs in enumerate(per_rank):
        assert len(diffs) == len(ARCHS) * (len(LAYOUTS) + 2)
        for key, diff in diffs.items():
            assert diff < TOL, f"rank {rank} {key}: max abs logit diff {diff:.2e}"
