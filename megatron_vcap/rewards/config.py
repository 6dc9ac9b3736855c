"""Reward and judge configs: weights, think-score similarity, caption score mode, judge client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vcap.config.loader import ConfigError


@dataclass
class RewardConfig:
    w_format: float = 1.0
    w_think: float = 1.0
    w_caption: float = 1.0
    think_backend: Literal["lexical", "embedding"] = "lexical"
    subject_threshold: float = 0.3
    item_threshold: float = 0.5
    caption_score: Literal["escore", "cnscore"] = "escore"
    escore_mode: Literal["step", "linear", "f1"] = "step"
    escore_delta1: float = 0.28
    escore_delta2: float = 0.35
    # A sample whose judge call failed after retries: drop it from the loss, or score it 0.
    on_judge_failure: Literal["drop", "zero"] = "drop"
    num_workers: int = 2

    def validate(self) -> None:
        if not 0 <= self.escore_delta1 <= self.escore_delta2 <= 1:
            raise ConfigError("escore_delta2: need 0 <= escore_delta1 <= escore_delta2 <= 1")
        for name in ("subject_threshold", "item_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1]")


@dataclass
class JudgeConfig:
    kind: Literal["embedded", "openai"] = "embedded"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen2.5-72B-Instruct"
    # Name of the environment variable holding the API key (the key itself never appears here).
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 64
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    cache_dir: str = ""
    temperature: float = 0.0

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency: must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError("max_retries: must be >= 0")
