"""Group advantages against a plain per-group loop, plus the edge cases GRPO depends on."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vcap.rl.advantages import compute_group_advantages, group_ids_from_layout


def _reference(rewards, groups, valid, scale_by_std, eps):
    """One group at a time with Python floats: the slow, obvious version."""
    adv = [0.0] * len(rewards)
    for g in sorted(set(groups)):
        idx = [i for i in range(len(rewards)) if groups[i] == g and valid[i]]
        if len(idx) < 2:
            continue
        vals = [rewards[i] for i in idx]
        if max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in idx:
            adv[i] = (rewards[i] - mean) / (std + eps) if scale_by_std else rewards[i] - mean
    return adv


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_matches_loop_reference_with_shuffled_groups_and_invalid(scale_by_std):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=gen) * 3
    groups = torch.randint(0, 7, (40,), generator=gen) * 11  # arbitrary ids, any order
    valid = torch.rand(40, generator=gen) > 0.2
    adv, metrics = compute_group_advantages(
        rewards, groups, scale_by_std=scale_by_std, eps=1e-6, valid_B=valid
    )
    ref = _reference(rewards.tolist(), groups.tolist(), valid.tolist(), scale_by_std, 1e-6)
    torch.testing.assert_close(adv, torch.tensor(ref), atol=1e-5, rtol=1e-5)
    assert (adv[~valid] == 0).all()
    assert metrics["num_valid"] == float(valid.sum())
    assert adv.abs().sum() > 1.0  # the comparison above is not between two zero vectors


def test_contiguous_layout_equals_explicit_ids():
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.2, 1.0, 3.0, 3.0, 2.0])
    a, _ = compute_group_advantages(rewards, group_size=4)
    b, _ = compute_group_advantages(rewards, group_ids_from_layout(8, 4))
    torch.testing.assert_close(a, b)
    # Each group is centred: its advantages sum to zero.
    torch.testing.assert_close(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-6, rtol=0)


def test_all_equal_rewards_give_exact_zero():
    # 0.1 * 3 is not exact in binary floating point: std would be ~1e-17, not 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.4], dtype=torch.float64)
    adv, metrics = compute_group_advantages(rewards, group_size=3)
    assert (adv[:3] == 0).all()
    assert (adv[3:] != 0).all()
    assert metrics["frac_groups_no_signal"] == 0.5


def test_group_size_one_gives_zero():
    adv, metrics = compute_group_advantages(torch.tensor([0.3, 0.9, -1.0]), group_size=1)
    assert (adv == 0).all()
    assert metrics["frac_groups_no_signal"] == 1.0


def test_invalid_sample_excluded_from_statistics():
    rewards = torch.tensor([1.0, 0.0, 100.0, 0.5])
    valid = torch.tensor([True, True, False, True])
    adv, _ = compute_group_advantages(rewards, group_size=4, valid_B=valid, scale_by_std=False)
    # Mean over the three valid samples is 0.5; the 100 does not move it.
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # One valid sample left in a group: nothing to compare against.
    adv, _ = compute_group_advantages(
        rewards, group_size=2, valid_B=torch.tensor([True, False, True, True])
    )
    assert adv[0] == 0 and adv[1] == 0 and adv[2] != 0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        compute_group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        compute_group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="non-finite"):
        compute_group_advantages(torch.tensor([1.0, float("nan")]), group_size=2)
    # ... but a NaN on an invalid sample is fine: it is excluded.
    adv, _ = compute_group_advantages(
        torch.tensor([1.0, float("nan"), 0.0]),
        group_size=3,
        valid_B=torch.tensor([True, False, True]),
    )
    assert torch.isfinite(adv).all()
