"""Supervised fine-tuning on the same data pipeline: cold starts and the paper's SFT baseline.

The target is the structured response (``<think>`` subjects, then ``<answer>`` caption) rendered
from the manifest's ground truth; the loss is token-mean cross-entropy over the target tokens of
the whole global batch (all micro-batches and data-parallel ranks), the same normalisation the
GRPO update uses.
"""

from __future__ import annotations

import time

import torch

from megatron_vcap.rl.engine import (
    SFT_STEP_REDUCTIONS,
    reduce_microbatch_metrics,
    run_microbatches,
    sft_loss_fn,
)
from megatron_vcap.rl.losses import compute_loss_normaliser
from megatron_vcap.rl.policy import sequence_multiple
from megatron_vcap.rl.records import TrainBatch
from megatron_vcap.trainer.metrics import Metric, gather_rank_metrics
from megatron_vcap.trainer.metrics_log import PhaseTimer
from megatron_vcap.trainer.optim import optimizer_step, zero_grads


def build_sft_batch(examples, pad_token_id: int, pad_to_multiple_of: int = 1) -> TrainBatch:
    """``examples``: (input_ids_L, labels_L, position_ids_3L, vision) per row -> a TrainBatch
    whose loss mask is 1 on the target tokens (labels != -100), right-padded to a multiple of
    ``pad_to_multiple_of``."""
    lengths = [ids.numel() for ids, _, _, _ in examples]
    B, width = len(examples), max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    tokens_BT = torch.full((B, width), pad_token_id, dtype=torch.long)
    position_ids_3BT = torch.zeros(3, B, width, dtype=torch.long)
    loss_mask_BT = torch.zeros(B, width, dtype=torch.float32)
    for b, (ids, labels, positions, _) in enumerate(examples):
        n = ids.numel()
        tokens_BT[b, :n] = ids
        position_ids_3BT[:, b, :n] = positions
        loss_mask_BT[b, :n] = (labels != -100).float()
    return TrainBatch(
        tokens_BT=tokens_BT,
        position_ids_3BT=position_ids_3BT,
        loss_mask_BT=loss_mask_BT,
        adv_B=torch.zeros(B),
        prompt_index_B=torch.arange(B),
        seq_len_B=torch.tensor(lengths),
        vision=[vision for _, _, _, vision in examples],
    )


class SFTController:
    def __init__(self, cfg, ctx, bundle, prompt_builder):
        self.cfg = cfg
        self.ctx = ctx
        self.bundle = bundle
        self.prompts = prompt_builder

    def build_batch(self, items) -> TrainBatch:
        from megatron_vcap.models.mrope import compute_mrope_position_ids

        examples = []
        for item in items:
            input_ids_L, labels_L = item.input_ids, item.labels
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
            examples.append((input_ids_L, labels_L, positions[:, 0], vision))
        return build_sft_batch(
            examples, self.prompts.pad_token_id, sequence_multiple(self.cfg.model)
        )

    def step(self, items, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        with timer.phase("update"):
            t0 = time.perf_counter()
            batch = self.build_batch(items)
            micro_batches = batch.micro_batches(
                self.cfg.train.micro_batch_size, multiple=sequence_multiple(self.cfg.model)
            )
            normaliser = compute_loss_normaliser(
                [mb.loss_mask_BT for mb in micro_batches],
                aggregation="token_mean",
                group=self.ctx.dp_cp_group,
            )
            zero_grads(self.bundle)
            loss_fn = sft_loss_fn(
                tp_group=self.ctx.tp_group,
                normaliser=normaliser,
                # No CP factor: Megatron's schedule already multiplies the loss by the CP size
                # (context_parallel_size > 1 is refused by validate_job until CP is built).
                undo_averaging=len(micro_batches) * self.ctx.dp_size,
            )
            outputs = run_microbatches(
                self.bundle.ddp_model,
                micro_batches,
                loss_fn,
                forward_only=False,
                pack=self.cfg.train.pack_sequences,
                multiple=sequence_multiple(self.cfg.model),
            )
            metrics = reduce_microbatch_metrics(outputs, SFT_STEP_REDUCTIONS)
            metrics.update(optimizer_step(self.bundle))
            tokens = sum(int(mb.tokens_BT.numel()) for mb in micro_batches)
            metrics["tokens_per_s"] = Metric(tokens / max(time.perf_counter() - t0, 1e-9), "mean")
        metrics.update(timer.as_metrics())
        return gather_rank_metrics(metrics, self.ctx)
