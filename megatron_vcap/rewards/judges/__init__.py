"""Judges for the caption scores: ``openai`` (any OpenAI-compatible endpoint) and ``embedded``."""

from __future__ import annotations

from concurrent.futures import Executor

from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.rewards.judges.base import CaptionJob, Judge, JudgeError, Judgment
from megatron_vcap.rewards.similarity import EmbeddingCache

__all__ = ["CaptionJob", "Judge", "JudgeError", "Judgment", "build_judge"]


def build_judge(
    cfg: JudgeConfig, cache: EmbeddingCache | None = None, executor: Executor | None = None
) -> Judge:
    """The judge named by ``cfg.kind``; ``cache`` / ``executor`` serve the embedded judge."""
    cfg.validate()
    if cfg.kind == "openai":
        from megatron_vcap.rewards.judges.openai_judge import OpenAIJudge

        return OpenAIJudge(cfg)
    if cfg.kind == "embedded":
        from megatron_vcap.rewards.judges.embedded import EmbeddedJudge

        return EmbeddedJudge(cfg, cache or EmbeddingCache(), executor)
    raise ValueError(f"judge.kind: expected 'embedded' or 'openai', got {cfg.kind!r}")
