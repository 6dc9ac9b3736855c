"""The trainer: builds every component from a validated JobConfig and runs GRPO or SFT steps.

Time, data and checkpoints live here; the model/optimizer/algorithm live in the controllers
(``grpo.py``, ``sft.py``). Run under ``torchrun`` or ``srun`` via ``vcap train``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vcap.config.loader import to_dict
from megatron_vcap.trainer.judge_wait import wait_for_judge
from megatron_vcap.trainer.preemption import (
    EXIT_PREEMPTED,
    REASON_NAMES,
    REASON_NONE,
    build_stop_guard,
)

log = logging.getLogger(__name__)


@dataclass
class Components:
    ctx: object
    hf_dir: Path
    hf_config: object
    tokenizer: object
    bundle: object
    reference: object | None
    prompt_builder: object


def build_policy(cfg, hf_config, hf_dir: Path):
    """The policy model with its initial weights (pretrained checkpoint, HF weights, or random)."""
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    model = build_qwen_vl_model(
        hf_config, cfg.model, sequence_parallel=cfg.parallel.sequence_parallel
    )
    if cfg.checkpoint.pretrained:
        from megatron_vcap.convert.checkpoint import load_model_checkpoint

        load_model_checkpoint(cfg.checkpoint.pretrained, model)
    elif any(hf_dir.glob("*.safetensors")):
        from megatron_vcap.convert.checkpoint import load_hf_weights

        load_hf_weights(model, hf_dir)
    else:
        log.warning("no weights in %s and no checkpoint.pretrained: random initial weights", hf_dir)
    return model


def build_components(cfg, ctx) -> Components:
    from transformers import AutoTokenizer

    from megatron_vcap.config.job import resolve_hf_dir
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.rl.policy import PromptBuilder, ReferencePolicy
    from megatron_vcap.trainer.optim import build_optimizer

    hf_dir = resolve_hf_dir(cfg)
    hf_config = load_hf_config(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = build_policy(cfg, hf_config, hf_dir)
    reference = None
    if cfg.train.mode == "grpo" and cfg.grpo.kl_beta > 0:
        from megatron_vcap.models.qwen_vl import build_qwen_vl_model

        ref_model = build_qwen_vl_model(
            hf_config,
            cfg.model,
            init_weights=False,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        ref_model.load_state_dict(model.state_dict())
        reference = ReferencePolicy(ref_model, offload=cfg.grpo.reference_on_cpu)
    bundle = build_optimizer(model, cfg.train, cfg.parallel, bf16=cfg.model.params_dtype == "bf16")
    return Components(
        ctx, hf_dir, hf_config, tokenizer, bundle, reference, PromptBuilder(tokenizer, hf_config)
    )


def items_per_step(cfg, ctx) -> int:
    """Prompts (GRPO) or samples (SFT) per step on this rank (divisibility: ``validate_job``)."""
    total = cfg.grpo.prompts_per_step if cfg.train.mode == "grpo" else cfg.train.global_batch_size
    assert total % ctx.dp_size == 0, (total, ctx.dp_size)
    return total // ctx.dp_size


def build_data(cfg, ctx, tokenizer):
    from megatron_vcap.data.loader import build_loader
    from megatron_vcap.data.manifest import load_manifest

    samples = load_manifest(cfg.data.train_manifest)
    return build_loader(
        samples,
        cfg.data,
        tokenizer,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp_size,
        seed=cfg.data.seed,
        mode="rollout" if cfg.train.mode == "grpo" else "sft",
    )


def build_controller(cfg, comps: Components):
    if cfg.train.mode == "sft":
        from megatron_vcap.rl.sft import SFTController

        return SFTController(cfg, comps.ctx, comps.bundle, comps.prompt_builder), None
    from megatron_vcap.rewards.service import RewardService
    from megatron_vcap.rl.grpo import GRPOController

    leader = comps.ctx.tp_rank == 0 and comps.ctx.pp_rank == 0
    service = RewardService(cfg.reward, cfg.judge) if leader else None
    controller = GRPOController(
        cfg,
        comps.ctx,
        comps.bundle,
        comps.reference,
        comps.tokenizer,
        comps.prompt_builder,
        service,
    )
    return controller, service


def launch_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this launch: the process group's if one exists, else the launcher's."""
    from megatron_vcap.parallel.launch_env import read_launch_env

    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = read_launch_env()
    return env.rank, env.world_size


def train_main(cfg, *, probe_judge: bool = False, verbose: bool = False) -> int:
    """Entry point of ``vcap train``: validates the whole job first (``validate_job``), so a
    config mistake stops every rank before any process group or model exists. Log records go to
    ``<run_dir>/logs/`` and a quiet console (``run_logging``); ``verbose`` prints them all."""
    from megatron_vcap.trainer.run_logging import setup_run_logging

    rank, world_size = launch_rank_and_size()
    # Before Megatron and the libraries are imported: their import-time warnings go to the file.
    run_logging = setup_run_logging(cfg.train.run_dir, rank, verbose=verbose)
    try:
        return _train(cfg, rank, world_size, probe_judge, run_logging.log_file)
    finally:
        run_logging.close()


def _train(cfg, rank: int, world_size: int, probe_judge: bool, log_file: Path) -> int:
    from megatron_vcap.config.job import save_resolved_config, validate_job
    from megatron_vcap.parallel.runtime import destroy_distributed, init_distributed
    from megatron_vcap.trainer.checkpointing import CheckpointManager, find_latest
    from megatron_vcap.trainer.metrics import gather_rank_metrics
    from megatron_vcap.trainer.metrics_log import MetricsLogger
    from megatron_vcap.trainer.run_logging import count_parameters, startup_summary

    wait_for_judge(cfg.judge)  # judge.base_url_file: a judge server started by another job
    # The judge is probed once per launch, from the first rank.
    check = validate_job(cfg, world_size, probe_judge=probe_judge and rank == 0)
    # Before any child process exists: data workers and checkpoint writers inherit the blocked
    # stop signals, so a SIGTERM sent to every process of a Slurm step does not kill them.
    guard = build_stop_guard(cfg.train)
    owns_process_group = not torch.distributed.is_initialized()
    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    guard.device = ctx.device
    run_dir = Path(cfg.train.run_dir)
    if ctx.rank == 0:
        save_resolved_config(cfg, run_dir)
    comps = build_components(cfg, ctx)
    loader = build_data(cfg, ctx, comps.tokenizer)
    num_params = count_parameters(comps.bundle.model, ctx)
    if ctx.rank == 0:
        print(startup_summary(cfg, ctx, check, num_params=num_params,
                              num_samples=loader.stream.num_samples, log_file=log_file), flush=True)  # fmt: skip
    n_items = items_per_step(cfg, ctx)
    save_dir = Path(cfg.checkpoint.save_dir or run_dir / "checkpoints")
    ckpt = CheckpointManager(
        save_dir, keep_last=cfg.checkpoint.keep_last, hf_assets_dir=comps.hf_dir
    )
    start = resume(cfg, ckpt, comps.bundle, loader, save_dir, find_latest)
    controller, service = build_controller(cfg, comps)
    logger = MetricsLogger(
        run_dir, cfg.logging, enabled=ctx.is_logging_rank, config_dict=to_dict(cfg)
    )

    def save(step: int) -> None:
        ckpt.save(
            step,
            comps.bundle,
            trainer_state={"scheduler": comps.bundle.scheduler.state_dict()},
            rank_state={"loader": loader.state_dict()},
        )

    saved_at, stop = start, REASON_NONE
    try:
        for step in range(start, cfg.train.steps):
            stop = guard.should_stop()  # collective: every rank stops at the same step
            if stop:
                preempt_save(step, saved_at, stop, guard, save)
                break
            t0 = time.monotonic()
            items = loader.next_batch(n_items)
            metrics = controller.step(items, step)
            metrics.update(gather_rank_metrics(loader.metrics(), ctx))
            logger.log(step + 1, metrics, prefix=cfg.train.mode)
            guard.step_done(time.monotonic() - t0)
            done = step + 1 == cfg.train.steps
            interval = cfg.checkpoint.save_interval
            if done or (interval and (step + 1) % interval == 0):
                save(step + 1)
                saved_at = step + 1
    finally:
        guard.close()
        logger.close()
        if service is not None:
            service.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    destroy_distributed(process_group=owns_process_group)
    return EXIT_PREEMPTED if stop else 0


def preempt_save(step: int, saved_at: int, reason: int, guard, save) -> None:
    """The stop agreed at the boundary after ``step`` steps: save unless that state is saved."""
    t0 = time.monotonic()
    if saved_at != step:
        save(step)
    log.warning(
        "stopping at step %d (%s): checkpoint %s in %.1f s, %s; exit code %d",
        step,
        REASON_NAMES[reason],
        "saved" if saved_at != step else "already on disk",
        time.monotonic() - t0,
        guard.summary(),
        EXIT_PREEMPTED,
    )


def resume(cfg, ckpt, bundle, loader, save_dir: Path, find_latest) -> int:
    """Restore the newest checkpoint if asked; returns the step to start from."""
    load = cfg.checkpoint.load
    if not load:
        return 0
    path = find_latest(save_dir) if load == "auto" else Path(load)
    if path is None:
        return 0
    trainer, rank_state = ckpt.load(path, bundle)
    if "loader" in rank_state:
        loader.load_state_dict(rank_state["loader"])
    log.info("resumed from %s at step %d", path, trainer["step"])
    return int(trainer["step"])
