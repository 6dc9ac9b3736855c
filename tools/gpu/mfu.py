"""Kit section ``mfu``: train-phase model FLOPs utilisation on Qwen2.5-VL-7B-shaped layers.

Our ``QwenVLModel`` with the 7B's widths (the full 32-block vision tower; as many LM layers as
fit beside it, at most 12, ``VCAP_KIT_MFU_LAYERS`` overrides) trains in bf16 exactly as SFT
does: Megatron DDP + distributed optimizer, ``run_microbatches`` over micro-batches of one
sequence (a 16-frame 448x448 video = 2048 video tokens inside 4096 tokens), the token-mean
cross-entropy closure, one optimizer step. Timed: whole optimizer steps after two warm-up steps.
FLOPs per step: Megatron's LM formula plus the vision tower (:mod:`tools.gpu.flops`); MFU is
against the datasheet's dense bf16 peak and against a bf16 matrix product measured here.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from tools.gpu import flops, shapes
from tools.gpu.common import (
    SectionContext,
    SectionResult,
    device,
    init_single_rank,
    measure_matmul_flops,
    peak_memory_gib,
    synchronize,
)

GPU = dict(frames=16, side=448, seq=4096, micro_batches=2, timed_steps=3)
DRY = dict(frames=4, side=56, seq=96, micro_batches=2, timed_steps=2)


def choose_layers(dry_run: bool) -> int:
    if os.environ.get("VCAP_KIT_MFU_LAYERS"):
        return int(os.environ["VCAP_KIT_MFU_LAYERS"])
    if dry_run:
        return 2
    s = shapes.QWEN25_VL_7B
    hidden, heads = s["text_hidden_size"], s["text_num_attention_heads"]
    per_layer = shapes.lm_layer_params(hidden, heads, s["text_num_key_value_heads"],
                                       hidden // heads, s["text_intermediate_size"])  # fmt: skip
    vision = 32 * (4 * 1280**2 + 3 * 1280 * 3420) + 5120**2 + 5120 * hidden
    fixed = 2 * s["vocab_size"] * hidden + vision
    total = torch.cuda.get_device_properties(0).total_memory
    return shapes.layers_that_fit(total, fixed_params=fixed, per_layer_params=per_layer)


def build_batch(config, shape: dict):
    """``micro_batches`` rows, each: text, one video, text; loss on the text after the video."""
    from megatron_vcap.models.hf_config import describe_hf_config
    from megatron_vcap.models.mrope import compute_mrope_position_ids
    from megatron_vcap.rl.sft import build_sft_batch

    spec = describe_hf_config(config)
    patch = spec.patch_size
    grid = torch.tensor([[shape["frames"] // spec.temporal_patch_size,
                          shape["side"] // patch, shape["side"] // patch]])  # fmt: skip
    n_video = int(grid.prod()) // spec.spatial_merge_size**2
    prefix, suffix = 16, shape["seq"] - 16 - n_video - 2
    if suffix < 8:
        raise ValueError(f"mfu: seq {shape['seq']} too short for {n_video} video tokens")
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(shape["micro_batches"]):
        text = torch.randint(0, spec.vocab_size - 16, (prefix + suffix,), generator=gen)
        ids = torch.cat([text[:prefix], torch.tensor([spec.vision_start_token_id]),
                         torch.full((n_video,), spec.video_token_id),
                         torch.tensor([config.vision_end_token_id]), text[prefix:]])  # fmt: skip
        labels = ids.clone()
        labels[: prefix + n_video + 2] = -100
        positions, _ = compute_mrope_position_ids(
            ids[None], video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]), hf_config=config
        )
        patch_dim = spec.in_channels * spec.temporal_patch_size * patch * patch
        pixels = torch.randn(int(grid.prod()), patch_dim, generator=gen)
        vision = {"pixel_values_videos": pixels, "video_grid_thw": grid}
        examples.append((ids, labels, positions[:, 0], vision))
    return build_sft_batch(examples, pad_token_id=0), spec, grid


def step_fn(bundle, batch, pctx):
    """One SFT optimizer step, as ``SFTController.step`` runs it."""
    from megatron_vcap.rl.engine import run_microbatches, sft_loss_fn
    from megatron_vcap.rl.losses import compute_loss_normaliser
    from megatron_vcap.trainer.optim import optimizer_step, zero_grads

    micro = batch.micro_batches(1)
    normaliser = compute_loss_normaliser(
        [mb.loss_mask_BT for mb in micro], aggregation="token_mean"
    )
    zero_grads(bundle)
    loss_fn = sft_loss_fn(tp_group=pctx.tp_group, normaliser=normaliser, undo_averaging=len(micro))
    outputs = run_microbatches(bundle.ddp_model, micro, loss_fn, forward_only=False)
    metrics = optimizer_step(bundle)
    return sum(float(o["loss"]) for o in outputs), metrics


def run(ctx: SectionContext) -> SectionResult:
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.trainer.config import TrainConfig
    from megatron_vcap.trainer.optim import build_optimizer

    res = SectionResult()
    pctx = init_single_rank()
    gpu = device().type == "cuda"
    shape = DRY if ctx.dry_run else GPU
    layers = choose_layers(ctx.dry_run)
    config = shapes.qwen_vl_config(
        ctx.dry_run, layers=layers, vision_depth=2 if ctx.dry_run else 32
    )
    dtype = "bf16" if gpu else "fp32"  # bf16 GEMMs on CPU are slow emulation: a dry run only
    model = build_qwen_vl_model(config, ModelConfig(params_dtype=dtype, transformer_impl="auto"))
    params = sum(p.numel() for p in model.parameters())
    bundle = build_optimizer(model, TrainConfig(lr=1e-5, steps=100), ParallelConfig(),
                             bf16=dtype == "bf16")  # fmt: skip
    batch, spec, grid = build_batch(config, shape)
    seq_lens = batch.seq_len_B.tolist()
    lm = flops.lm_train_flops(seq_lens, **flops.lm_shape(spec))
    vision = flops.vision_train_flops(grid.tolist() * len(seq_lens), **flops.vision_shape(spec))
    res.figures.update(lm_layers=layers, vision_depth=spec.vision_depth, params=params,
                       dtype=dtype, seq_lens=seq_lens, video_grid_thw=grid.tolist()[0],
                       flops_per_step=lm + vision, lm_flops=lm, vision_flops=vision)  # fmt: skip
    losses, times = [], []
    for i in range(2 + shape["timed_steps"]):
        synchronize()
        t0 = time.perf_counter()
        loss, metrics = step_fn(bundle, batch, pctx)
        synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            losses.append(loss)
        if i >= 2 and ctx.time_left() < 30:
            res.notes.append(f"stopped after {len(times)} timed steps: the deadline is near")
            break
    step_s = statistics.median(times)
    achieved = (lm + vision) / step_s
    peak_measured = measure_matmul_flops(8192 if gpu else 512)
    ceiling = flops.datasheet_ceiling(torch.cuda.get_device_name(0) if gpu else "cpu")
    res.figures.update(step_s=step_s, step_times_s=times, achieved_tflops=achieved / 1e12,
                       measured_matmul_tflops=peak_measured / 1e12,
                       mfu_vs_measured_matmul=achieved / peak_measured,
                       tokens_per_s=sum(seq_lens) / step_s, peak_memory_gib=peak_memory_gib(),
                       grad_norm=metrics["grad_norm"], losses=losses)  # fmt: skip
    if ceiling.bf16_flops:
        res.figures["datasheet_bf16_tflops"] = ceiling.bf16_flops / 1e12
        res.figures["mfu"] = achieved / ceiling.bf16_flops
    res.check("losses finite", all(torch.isfinite(torch.tensor(losses))), value=losses[-1])
    mfu = res.figures.get("mfu", res.figures["mfu_vs_measured_matmul"])
    if ctx.dry_run:  # CPU timings on a shared machine are noise; never fail on them
        res.check("MFU finite", math.isfinite(mfu), value=mfu)
    else:
        res.check("MFU in (0, 1]", 0 < mfu <= 1, value=mfu)
    return res
