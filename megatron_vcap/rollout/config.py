"""Rollout (generation) config: sampling parameters and generation limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vcap.config.loader import ConfigError


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    """The sampling ranges, shared by the config and ``SamplingParams``."""
    if temperature < 0:
        raise ConfigError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k: must be >= 0, got {top_k}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 1024
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"])
    # Prompts generated together (each expands to group_size samples): bounds the KV cache.
    prompts_per_batch: int = 4
    share_prefix: bool = True
    # KV-cache row layout for prompts of different lengths (see rollout/generate.py): "auto"
    # picks "aligned" with Transformer Engine attention (which ignores decode masks), else
    # "left_pad".
    kv_layout: Literal["auto", "left_pad", "aligned"] = "auto"

    def validate(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens)
        if self.prompts_per_batch < 1:
            raise ConfigError(f"prompts_per_batch: must be >= 1, got {self.prompts_per_batch}")
