"""GRPO algorithm config (group size, clipping, KL penalty, loss aggregation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vcap.config.loader import ConfigError


@dataclass
class GRPOConfig:
    group_size: int = 8
    prompts_per_step: int = 16
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_beta: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Divide group-centred rewards by the group std (GRPO) or only centre them (Dr. GRPO).
    scale_by_std: bool = True
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = (
        "token_mean"
    )
    updates_per_batch: int = 1
    # Keep the frozen reference weights on CPU between reference log-prob passes.
    reference_on_cpu: bool = True
    # Truncated importance sampling: weight each token's policy-gradient term by
    # min(pi_trainer / pi_sampler, tis_cap) when the rollout engine's log-probs differ from the
    # trainer's (bf16 KV-cached decode vs full forward; see rollout/logp_gap_*). null = off.
    tis_cap: float | None = None
    # Decode the first sample of each group greedily (the others at rollout.temperature). The
    # evaluation decodes greedily; the anchor puts that answer in every group, so a greedy
    # failure the sampled answers do not show (e.g. a repetition loop running to
    # max_new_tokens) gets a negative advantage. Its tokens are scored at rollout.temperature
    # like the rest; the policy-gradient estimate is then no longer purely on-policy.
    greedy_anchor: bool = False

    def validate(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"group_size: must be >= 1, got {self.group_size}")
        if self.prompts_per_step < 1:
            raise ConfigError(f"prompts_per_step: must be >= 1, got {self.prompts_per_step}")
        for name in ("clip_eps_low", "clip_eps_high", "kl_beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.updates_per_batch < 1:
            raise ConfigError("updates_per_batch: must be >= 1")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ConfigError(f"tis_cap: must be > 0 (or null to disable), got {self.tis_cap}")
        if self.greedy_anchor and self.group_size < 2:
            raise ConfigError("greedy_anchor: needs group_size >= 2 (one greedy, one sampled)")
