"""Group-relative advantages for GRPO: each sample's reward against its own group's statistics.

A group is the G responses sampled for one prompt. The advantage of a sample is its reward minus
the mean reward of the valid samples in its group, divided by that group's standard deviation
(GRPO) or left unscaled (Dr. GRPO, ``scale_by_std=False``). Samples marked invalid (dropped, e.g.
because the judge failed) take no part in their group's statistics and get advantage 0; the
caller also zeroes their loss mask. A group whose valid rewards are all equal, or that has fewer
than two valid samples, carries no learning signal and gets advantage 0 everywhere.

Shape legend: B = samples (all groups together), N = groups.
"""

from __future__ import annotations

import torch

from megatron_vcap.trainer.metrics import Metric

__all__ = ["compute_group_advantages", "group_ids_from_layout"]


def group_ids_from_layout(num_samples: int, group_size: int, device=None) -> torch.Tensor:
    """Group ids for the contiguous layout ``[g0 s0..s(G-1), g1 s0.., ...]``: returns ids_B."""
    if group_size < 1 or num_samples % group_size != 0:
        raise ValueError(
            f"group_size: {num_samples} samples do not split into groups of {group_size}"
        )
    return torch.arange(num_samples, device=device) // group_size


def compute_group_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    valid_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-normalised advantages.

    Args:
        rewards_B: float rewards, one per sample.
        group_ids_B: integer group of each sample (any ids, any order). Give either this or
            ``group_size`` for the contiguous layout of ``group_size`` samples per group.
        scale_by_std: divide the centred reward by the group's (unbiased, N-1) std + ``eps``.
        valid_B: bool; invalid samples are excluded from the statistics and get advantage 0.

    Returns:
        ``(adv_B, metrics)``: adv_B float32 with the rewards' device; metrics are ``Metric``
        floats over valid samples (reward mean/std, fraction of groups without signal, ...),
        each declaring how it merges over data-parallel ranks.
    """
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards_B: expected 1-D, got shape {tuple(rewards_B.shape)}")
    num = rewards_B.numel()
    if (group_ids_B is None) == (group_size is None):
        raise ValueError("give exactly one of group_ids_B or group_size")
    if group_ids_B is None:
        group_ids_B = group_ids_from_layout(num, group_size, rewards_B.device)
    if group_ids_B.shape != rewards_B.shape:
        raise ValueError(
            f"group_ids_B: shape {tuple(group_ids_B.shape)} != rewards {tuple(rewards_B.shape)}"
        )
    if valid_B is None:
        valid_B = torch.ones(num, dtype=torch.bool, device=rewards_B.device)
    valid_B = valid_B.bool()
    rewards = rewards_B.detach().to(
        torch.float64
    )  # stats in fp64: rewards are few, exactness is cheap
    if not torch.isfinite(rewards[valid_B]).all():
        raise ValueError("rewards_B: non-finite reward on a valid sample; mark it invalid instead")
    rewards = torch.where(valid_B, rewards, torch.zeros_like(rewards))

    _, group_B = torch.unique(group_ids_B, return_inverse=True)
    num_groups = int(group_B.max()) + 1 if num else 0
    weight = valid_B.to(torch.float64)
    count_N = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    count_N.index_add_(0, group_B, weight)
    sum_N = torch.zeros_like(count_N).index_add_(0, group_B, rewards * weight)
    mean_N = sum_N / count_N.clamp(min=1)
    centred_B = (rewards - mean_N[group_B]) * weight
    sq_N = torch.zeros_like(count_N).index_add_(0, group_B, centred_B**2)
    std_N = (sq_N / (count_N - 1).clamp(min=1)).sqrt()

    # Equal rewards are detected exactly (max == min) rather than through std, whose float
    # rounding would turn "no signal" into tiny nonzero advantages.
    big = torch.finfo(torch.float64).max
    max_N = torch.full_like(count_N, -big).scatter_reduce(
        0, group_B, torch.where(valid_B, rewards, torch.full_like(rewards, -big)), "amax"
    )
    min_N = torch.full_like(count_N, big).scatter_reduce(
        0, group_B, torch.where(valid_B, rewards, torch.full_like(rewards, big)), "amin"
    )
    # Fewer than two valid samples: no comparison is possible, so no signal either.
    informative_N = (count_N >= 2) & (max_N > min_N)
    adv_B = centred_B
    if scale_by_std:
        adv_B = adv_B / (std_N[group_B] + eps)
    adv_B = torch.where(informative_N[group_B] & valid_B, adv_B, torch.zeros_like(adv_B))

    valid_rewards = rewards[valid_B]
    n_valid = float(valid_B.sum())
    # Each metric declares its merge over data-parallel ranks (trainer/metrics.py).
    metrics = {
        "reward_mean": Metric(
            float(valid_rewards.mean()) if n_valid else 0.0, "weighted_mean", n_valid
        ),
        "reward_std": Metric(float(valid_rewards.std()) if n_valid > 1 else 0.0, "mean"),
        "num_valid": Metric(n_valid, "sum"),
        "frac_invalid": Metric(float(1.0 - weight.mean()) if num else 0.0, "weighted_mean", num),
        # Groups whose valid rewards are all equal (or too few) give zero gradient.
        "frac_groups_no_signal": Metric(
            float((~informative_N).double().mean()) if num_groups else 0.0,
            "weighted_mean",
            num_groups,
        ),
        "adv_abs_mean": Metric(
            float(adv_B[valid_B].abs().mean()) if n_valid else 0.0, "weighted_mean", n_valid
        ),
    }
    return adv_B.to(torch.float32), metrics
