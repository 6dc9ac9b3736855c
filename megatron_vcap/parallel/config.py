"""Parallel layout config: tensor, pipeline, context and data parallel sizes and the backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vcap.config.loader import ConfigError


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # "auto": NCCL when CUDA is available, gloo otherwise.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    use_distributed_optimizer: bool = True
    timeout_minutes: int = 30

    def validate(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "timeout_minutes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("sequence_parallel: needs tensor_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def validate_world_size(self, world_size: int) -> int:
        """Check the layout against the launch; returns the data-parallel size."""
        mp = self.model_parallel_size
        if world_size % mp != 0:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by tensor x pipeline x "
                f"context parallel = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} x {self.context_parallel_size} = {mp}"
            )
        return world_size // mp
