"""Supervised fine-tuning on the same data pipeline: cold starts and the paper's SFT baseline.

The target is the structured response (``<think>`` subjects, then ``<answer>`` caption) rendered
from the manifest's ground truth; the loss is token-mean cross-entropy over the target tokens of
the whole global batch (all micro-batches and data-parallel ranks), the same normalisation the
GRPO update uses.
"""

from __future__ import annotations

import time

import torch

from megatron_vcap.rl.batch import build_sft_row, split_micro_batches
from megatron_vcap.rl.engine import reduce_microbatch_metrics, run_microbatches, sft_loss_fn
from megatron_vcap.rl.losses import compute_loss_normaliser
from megatron_vcap.rl.metrics_log import PhaseTimer
from megatron_vcap.rl.optim import optimizer_step, zero_grads
from megatron_vcap.rl.policy import gather_rank_metrics


class SFTController:
    def __init__(self, cfg, ctx, bundle, prompt_builder):
        self.cfg = cfg
        self.ctx = ctx
        self.bundle = bundle
        self.prompts = prompt_builder

    def build_rows(self, items):
        from megatron_vcap.models.mrope import compute_mrope_position_ids

        rows = []
        for i, item in enumerate(items):
            input_ids_L, labels_L = item.sft
            video = item.video
            positions, _ = compute_mrope_position_ids(
                input_ids_L[None],
                video_grid_thw=video.video_grid_thw,
                second_per_grid_ts=torch.tensor([video.second_per_grid_ts], dtype=torch.float32),
                hf_config=self.prompts.hf_config,
            )
            vision = {
                "pixel_values_videos": video.pixel_values_videos,
                "video_grid_thw": video.video_grid_thw,
            }
            rows.append(
                build_sft_row(input_ids_L, labels_L, positions[:, 0], vision=vision, index=i)
            )
        return rows

    def step(self, items, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        with timer.phase("update"):
            t0 = time.perf_counter()
            rows = self.build_rows(items)
            micro_batches = split_micro_batches(
                rows, self.cfg.train.micro_batch_size, self.prompts.pad_token_id
            )
            normaliser = compute_loss_normaliser(
                [mb.target_mask_BT for mb in micro_batches],
                aggregation="token_mean",
                group=self.ctx.dp_cp_group,
            )
            zero_grads(self.bundle)
            loss_fn = sft_loss_fn(
                tp_group=self.ctx.tp_group,
                normaliser=normaliser,
                undo_averaging=len(micro_batches) * self.ctx.dp_size * self.ctx.cp_size,
            )
            outputs = run_microbatches(
                self.bundle.ddp_model, micro_batches, loss_fn, forward_only=False
            )
            metrics = reduce_microbatch_metrics(outputs)
            metrics.update(optimizer_step(self.bundle))
            tokens = sum(int(mb.tokens_BL.numel()) for mb in micro_batches)
            metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
        metrics.update(timer.as_metrics())
        return gather_rank_metrics(metrics, self.ctx)
