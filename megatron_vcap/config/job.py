"""The job config: every component's section composed into one validated tree.

Sections are owned by the code that uses them (``models/config.py``, ``data/config.py``, ...);
training-loop sections (train, checkpoint, logging) live here. ``load_job_config`` reads YAML,
applies ``a.b=c`` overrides and validates everything before any distributed work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_vcap.config.loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
)
from megatron_vcap.data.config import DataConfig
from megatron_vcap.models.config import ModelConfig
from megatron_vcap.parallel.config import ParallelConfig
from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
from megatron_vcap.rl.config import GRPOConfig
from megatron_vcap.rollout.config import RolloutConfig


@dataclass
class TrainConfig:
    mode: Literal["grpo", "sft"] = "grpo"
    steps: int = 100
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 1
    # SFT: samples per optimizer step across all data-parallel ranks.
    global_batch_size: int = 8
    seed: int = 1234
    run_dir: str = "runs/default"

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps: must be >= 0, got {self.steps}")
        if self.lr < 0 or self.min_lr < 0:
            raise ConfigError("lr: must be >= 0")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("micro_batch_size: batch sizes must be >= 1")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip: must be >= 0 (0 disables clipping)")


@dataclass
class CheckpointConfig:
    save_dir: str = ""  # empty: <run_dir>/checkpoints
    save_interval: int = 0  # steps; 0 saves only at the end
    keep_last: int = 2
    # Checkpoint to start from: a directory, "auto" (latest in save_dir, if any) or empty.
    load: str = "auto"
    # Initial weights (a converted Megatron checkpoint) when nothing is resumed.
    pretrained: str = ""

    def validate(self) -> None:
        if self.save_interval < 0 or self.keep_last < 1:
            raise ConfigError("keep_last: must be >= 1 and save_interval >= 0")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    wandb: bool = False
    wandb_project: str = "megatron_vcap"
    wandb_entity: str = ""
    run_name: str = ""

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError("log_interval: must be >= 1")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_job_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), world_size: int | None = None
) -> JobConfig:
    """YAML file + overrides -> validated JobConfig; checks the layout against ``world_size``."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    try:
        cfg = from_dict(JobConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    if world_size is not None:
        cfg.parallel.validate_world_size(world_size)
    return cfg


def save_resolved_config(cfg: JobConfig, run_dir: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    dump_yaml(cfg, out)
    return out
