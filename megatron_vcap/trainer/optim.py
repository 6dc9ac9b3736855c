"""Megatron DDP wrapper, (distributed) AdamW and the LR schedule for a policy model.

``build_optimizer`` wraps the model in Megatron's ``DistributedDataParallel`` (contiguous grad
buffers, fp32 grad reduction), builds Megatron's optimizer (the distributed optimizer shards
AdamW state over data-parallel ranks) and an ``OptimizerParamScheduler`` for warmup then cosine
or constant LR (``build_scheduler``; on resume only the step count comes from the checkpoint,
``restore_scheduler``). It also wires ``finalize_model_grads`` into the model config so Megatron's
forward-backward schedules reduce gradients across data-parallel ranks at the end of a step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_vcap.trainer.metrics import Metric

log = logging.getLogger(__name__)

# Scheduler state that the config decides, with the config key that sets it.
_SCHEDULE_KEYS = {
    "max_lr": "train.lr",
    "min_lr": "train.min_lr",
    "lr_warmup_steps": "train.warmup_steps",
    "lr_decay_steps": "train.steps",
    "lr_decay_style": "train.lr_schedule",
}


@dataclass
class OptimizerBundle:
    ddp_model: torch.nn.Module
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler

    @property
    def model(self) -> torch.nn.Module:
        """The unwrapped model (what sharded_state_dict / generation use)."""
        return self.ddp_model.module


def build_optimizer(model, train_cfg, parallel_cfg, *, bf16: bool) -> OptimizerBundle:
    """Wrap ``model`` in Megatron DDP and build optimizer + scheduler from ``train_cfg``."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.grad_clip,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    return OptimizerBundle(ddp_model, optimizer, build_scheduler(optimizer, train_cfg))


def build_scheduler(optimizer, train_cfg):
    """Megatron's ``OptimizerParamScheduler``: linear warmup, then cosine to ``min_lr`` over
    ``train.steps`` or constant. One scheduler step per optimizer step; the update of step k
    (1-based) uses the LR at ``num_steps = k - 1``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = max(train_cfg.steps, train_cfg.warmup_steps + 1)
    cosine = train_cfg.lr_schedule == "cosine"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train_cfg.warmup_steps > 0 else train_cfg.lr,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr if cosine else train_cfg.lr,
        lr_warmup_steps=train_cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style="cosine" if cosine else "constant",
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def restore_scheduler(scheduler, saved: dict) -> None:
    """Resume ``scheduler`` (built from this run's config) at the checkpoint's step count.

    The config's schedule wins: a run extended with a larger ``train.steps`` (or a new LR or
    schedule) follows its own config from the saved step on, not the schedule it was saved
    with (Megatron's own ``load_state_dict`` keeps the checkpoint's). One warning lists what
    differs.
    """
    differ = [
        f"{key} {saved[field]!r} -> {getattr(scheduler, field)!r}"
        for field, key in _SCHEDULE_KEYS.items()
        if field in saved and saved[field] != getattr(scheduler, field)
    ]
    if differ:
        log.warning(
            "resuming at step %d with the config's LR schedule, not the checkpoint's: %s",
            saved["num_steps"],
            "; ".join(differ),
        )
    scheduler.num_steps = 0
    scheduler.step(increment=int(saved["num_steps"]))


def optimizer_step(bundle: OptimizerBundle) -> dict[str, Metric]:
    """One optimizer + scheduler step after gradients are reduced; returns the grad norm and
    the LR this update used (the scheduler then moves on to the next step's)."""
    lr = bundle.optimizer.param_groups[0]["lr"]
    ok, grad_norm, _ = bundle.optimizer.step()
    bundle.scheduler.step(increment=1)
    # The gradient norm is computed after the data-parallel reduction: every rank holds the same.
    return {
        "grad_norm": Metric(float(grad_norm) if grad_norm is not None else float("nan"), "mean"),
        "lr": Metric(lr, "mean"),
        "update_skipped": Metric(float(not ok), "max"),
    }


def zero_grads(bundle: OptimizerBundle) -> None:
    bundle.ddp_model.zero_grad_buffer()
    bundle.optimizer.zero_grad()
