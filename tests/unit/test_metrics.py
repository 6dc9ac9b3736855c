"""Declared metric reductions: micro-batch and data-parallel merges, hand-computed."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from megatron_vcap.rl.engine import GRPO_STEP_REDUCTIONS, reduce_microbatch_metrics
from megatron_vcap.rl.losses import compute_grpo_loss
from megatron_vcap.trainer.metrics import Metric, merge_metrics


def test_each_reduction_by_hand():
    rank0 = {
        "loss": Metric(0.5, "sum"),
        "lr": Metric(1e-3, "mean"),
        "ratio_max": Metric(1.5, "max"),
        "ratio_min": Metric(0.9, "min"),
        "clip_frac": Metric(0.1, "weighted_mean", 10),
        "only_here": Metric(4.0, "mean"),
    }
    rank1 = {
        "loss": Metric(0.25, "sum"),
        "lr": Metric(1e-3, "mean"),
        "ratio_max": Metric(1.2, "max"),
        "ratio_min": Metric(0.7, "min"),
        "clip_frac": Metric(0.4, "weighted_mean", 30),
    }
    m = merge_metrics([rank0, rank1])
    assert m["loss"] == 0.75
    assert m["lr"] == pytest.approx(1e-3)
    # The largest ratio on any rank, not their mean (1.35).
    assert m["ratio_max"] == 1.5 and m["ratio_min"] == 0.7
    # Token-weighted: (0.1 * 10 + 0.4 * 30) / 40 = 0.325 (unweighted would be 0.25).
    assert m["clip_frac"] == pytest.approx(0.325) and m["clip_frac"].weight == 40
    assert m["only_here"] == 4.0


def test_weight_zero_contributes_nothing_and_undeclared_values_are_refused():
    m = merge_metrics(
        [{"kl_mean": Metric(7.0, "weighted_mean", 0)}, {"kl_mean": Metric(2.0, "weighted_mean", 5)}]
    )
    assert m["kl_mean"] == 2.0
    assert "kl_mean" not in merge_metrics([{"kl_mean": Metric(7.0, "weighted_mean", 0)}])
    with pytest.raises(TypeError, match="'tokens_per_s'"):
        merge_metrics([{"tokens_per_s": 3.0}])
    with pytest.raises(ValueError, match="'x'.*different reductions"):
        merge_metrics([{"x": Metric(1, "sum")}, {"x": Metric(1, "max")}])
    with pytest.raises(ValueError, match="reduction"):
        Metric(1.0, "median")


def test_metric_is_a_float_that_survives_pickle_and_json():
    m = Metric(2.5, "weighted_mean", 3)
    back = pickle.loads(pickle.dumps(m))  # all_gather_object pickles the dicts
    assert (float(back), back.reduce, back.weight) == (2.5, "weighted_mean", 3.0)
    assert json.loads(json.dumps({"k": m})) == {"k": 2.5}
    assert not isinstance(m + 1, Metric)  # arithmetic drops the declaration


def _mb(logp, old, mask, adv):
    loss, metrics = compute_grpo_loss(
        logp, old, None, adv, mask, normaliser=float(mask.sum()) or 1.0
    )
    metrics["loss"] = loss.detach()
    return metrics


def test_microbatch_merge_all_invalid_batch_reports_no_ratio_and_tokens_sum():
    """Three micro-batches: 3 valid tokens, 1 valid token, none (every sample dropped)."""
    old = torch.zeros(1, 4)
    a = _mb(
        torch.tensor([[0.1, -0.3, 0.2, 9.0]]),
        old,
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        torch.ones(1),
    )
    b = _mb(
        torch.tensor([[0.4, 0.0, 0.0, 0.0]]),
        old,
        torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        -torch.ones(1),
    )
    # The dropped micro-batch's ratios are far from 1 and must not show up anywhere.
    c = _mb(torch.tensor([[5.0, -5.0, 0.0, 0.0]]), old, torch.zeros(1, 4), torch.ones(1))
    assert "ratio_max" not in c and "ratio_min" not in c
    m = reduce_microbatch_metrics([a, b, c], GRPO_STEP_REDUCTIONS)
    ratios = [torch.exp(torch.tensor(x)).item() for x in (0.1, -0.3, 0.2, 0.4)]
    assert m["num_tokens"] == 4.0
    assert m["ratio_max"] == pytest.approx(max(ratios)) and m["ratio_min"] == pytest.approx(
        min(ratios)
    )
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / 4, rel=1e-6)
    # eps = 0.2: only exp(0.2) = 1.22 with adv > 0 takes the clipped branch (exp(0.1) is inside,
    # exp(-0.3) with adv > 0 and exp(0.4) with adv < 0 keep the unclipped, larger term). Token-
    # weighted over the 4 valid tokens: 1/4; an unweighted mean of (1/3, 0, 0) would be 1/9.
    assert m["clip_frac"] == pytest.approx(0.25)
    # The merged value carries its token count, so the data-parallel merge weights it by tokens.
    assert m["clip_frac"].weight == 4.0 and m["ratio_mean"].weight == 4.0
    with pytest.raises(KeyError, match="nll_mean"):
        reduce_microbatch_metrics([{"num_tokens": 1.0, "nll_mean": 1.0}], GRPO_STEP_REDUCTIONS)
