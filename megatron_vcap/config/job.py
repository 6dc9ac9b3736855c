"""The job config: every component's section composed into one validated tree.

Sections are owned by the code that uses them (``models/config.py``, ``data/config.py``, ...);
the training-loop sections (train, checkpoint, logging) in ``trainer/config.py``. ``load_job_config`` reads YAML,
applies ``a.b=c`` overrides and validates everything before any distributed work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
from megatron_vcap.trainer.config import CheckpointConfig, LoggingConfig, TrainConfig


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
