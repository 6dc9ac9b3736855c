"""Training-loop config sections: steps and optimizer (train), checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vcap.config.loader import ConfigError


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
    # Training passes (old / reference log-probs, update) run each micro-batch's rows as one
    # THD-packed sequence (rl/packing.py) instead of padding every row to the longest.
    pack_sequences: bool = True
    # SFT: samples per optimizer step across all data-parallel ranks.
    global_batch_size: int = 8
    seed: int = 1234
    run_dir: str = "runs/default"
    # Preemption (trainer/preemption.py): these signals make every rank save a checkpoint at the
    # next step boundary and exit with code 75; [] leaves the signals' default actions.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Leave with a checkpoint (exit 75) once the next step would end past this many minutes
    # after the trainer started; 0: no limit. Set it below the allocation's time limit.
    max_wall_minutes: float = 0.0

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps: must be >= 0, got {self.steps}")
        for name in ("lr", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip: must be >= 0 (0 disables clipping)")
        if self.max_wall_minutes < 0:
            raise ConfigError(f"max_wall_minutes: must be >= 0, got {self.max_wall_minutes}")
        from megatron_vcap.trainer.preemption import parse_signals

        try:
            parse_signals(self.stop_signals)
        except ValueError as exc:
            raise ConfigError(str(exc).removeprefix("train.")) from None


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
        if self.save_interval < 0:
            raise ConfigError(f"save_interval: must be >= 0, got {self.save_interval}")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last: must be >= 1, got {self.keep_last}")


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
