"""GRPO loss and token log-probs against plain per-token loops; micro-batching invariance."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vcap.rl.losses import (
    AGGREGATIONS,
    compute_grpo_loss,
    compute_kl,
    compute_loss_normaliser,
    compute_token_logprobs_and_entropy,
    compute_vocab_parallel_logprobs_and_entropy,
)


def _reference_loss(logp, old, ref, adv, mask, lo, hi, beta, est, aggregation):
    """Nested loops over Python floats: the textbook per-token formula."""
    B, T = len(logp), len(logp[0])
    per_seq_sum, per_seq_cnt = [], []
    for b in range(B):
        s, c = 0.0, 0
        for t in range(T):
            if not mask[b][t]:
                continue
            o = logp[b][t] if old is None else old[b][t]
            r = math.exp(logp[b][t] - o)
            rc = min(max(r, 1 - lo), 1 + hi)
            term = max(-adv[b] * r, -adv[b] * rc)
            if beta > 0:
                d = ref[b][t] - logp[b][t]
                kl = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[est]
                term += beta * kl
            s += term
            c += 1
        per_seq_sum.append(s)
        per_seq_cnt.append(c)
    if aggregation == "token_mean":
        return sum(per_seq_sum) / max(sum(per_seq_cnt), 1)
    nseq = sum(1 for c in per_seq_cnt if c > 0)
    if aggregation == "seq_mean_token_mean":
        return sum(s / max(c, 1) for s, c in zip(per_seq_sum, per_seq_cnt)) / nseq
    return sum(per_seq_sum) / nseq


def _random_batch(B=8, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # some get clipped
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[B // 2] = False  # a sequence with no valid token (e.g. dropped)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("use_old", [True, False])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_loss_matches_loop_reference(aggregation, use_old, est):
    logp, old, ref, adv, mask = _random_batch()
    old = old if use_old else None
    norm = compute_loss_normaliser(mask, aggregation=aggregation)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=0.04, kl_estimator=est)
    loss, metrics = compute_grpo_loss(
        logp, old, ref, adv, mask, aggregation=aggregation, normaliser=norm, **kwargs
    )
    expected = _reference_loss(
        logp.tolist(),
        None if old is None else old.tolist(),
        ref.tolist(),
        adv.tolist(),
        mask.tolist(),
        0.2,
        0.28,
        0.04,
        est,
        aggregation,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    if use_old:
        assert 0 < metrics["clip_frac"] < 1
    else:
        assert metrics["clip_frac"] == 0 and metrics["ratio_max"] == 1


def test_ratio_one_without_old_logp_has_policy_gradient():
    logp, _, _, adv, mask = _random_batch(B=3, T=4)
    logp = logp.clone().requires_grad_(True)
    loss, _ = compute_grpo_loss(logp, None, None, adv, mask, normaliser=float(mask.sum()))
    loss.backward()
    # d/dlogp of -A * exp(logp - sg(logp)) is -A at ratio 1, on valid tokens only.
    expected = -adv[:, None].expand_as(logp) * mask / mask.sum()
    torch.testing.assert_close(logp.grad, expected)


def test_k3_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.0, -1.0, -1.5]])
    # d = ref - logp = [0, 1, -1]: k3 = e^d - d - 1 = [0, e - 2, 1/e]
    kl = compute_kl(logp, ref, "k3")
    torch.testing.assert_close(kl, torch.tensor([[0.0, math.e - 2.0, math.exp(-1.0)]]))
    assert (compute_kl(logp, ref, "k3") >= 0).all()


def test_clipping_stops_gradient_outside_the_trust_region():
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    # ratios e^0.5 (above 1 + eps) and e^-0.5 (below 1 - eps) with positive and negative adv
    old = torch.tensor([[-0.5, 0.5, -0.5, 0.5]])
    for a, expect_grad in ((1.0, [0, 1, 0, 1]), (-1.0, [1, 0, 1, 0])):
        logp.grad = None
        loss, m = compute_grpo_loss(
            logp, old, None, torch.tensor([a]), torch.ones(1, 4), normaliser=4.0
        )
        loss.backward()
        assert ((logp.grad != 0).int().tolist()[0]) == expect_grad
        assert m["clip_frac"] == 0.5


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_one_microbatch_of_8_equals_two_of_4(aggregation):
    torch.manual_seed(0)
    B, T, V, H = 8, 6, 11, 5
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T))
    _, old, ref, adv, mask = _random_batch(B, T, seed=1)
    proj = torch.nn.Linear(H, V, dtype=torch.float64)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_beta=0.04, aggregation=aggregation)

    def loss_of(rows, norm):
        logp, _ = compute_token_logprobs_and_entropy(proj(hidden[rows]), tokens[rows])
        # old log-probs near the current ones so some ratios clip and some do not
        return compute_grpo_loss(
            logp, old[rows] * 0.1 + logp.detach() * 0.9, ref[rows], adv[rows], mask[rows],
            normaliser=norm, **kwargs,
        )[0]  # fmt: skip

    norm = compute_loss_normaliser(mask, aggregation=aggregation)
    # the helper gives the same normaliser from the micro-batch masks
    assert norm == compute_loss_normaliser([mask[:4], mask[4:]], aggregation=aggregation)
    full = loss_of(slice(0, 8), norm)
    full.backward()
    grads_full = [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    total = 0.0
    for rows in (slice(0, 4), slice(4, 8)):
        part = loss_of(rows, norm)
        part.backward()  # gradients accumulate, as in a micro-batch loop
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-14)
    for g_full, p in zip(grads_full, proj.parameters()):
        torch.testing.assert_close(p.grad, g_full, rtol=1e-10, atol=1e-14)
        assert g_full.abs().max() > 1e-6


def test_token_logprobs_and_entropy_match_plain_softmax_with_gradients():
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 17, dtype=torch.float64)).requires_grad_(True)
    tokens = torch.randint(0, 17, (3, 5))
    w_logp, w_ent = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)

    logp, ent = compute_token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    (g_ours,) = torch.autograd.grad((logp * w_logp).sum() + (ent * w_ent).sum(), logits)

    ref_logp, ref_ent = [], []
    for b in range(3):
        row_lp, row_ent = [], []
        for t in range(5):
            lsm = torch.log_softmax(logits[b, t] / 0.7, -1)
            row_lp.append(lsm[tokens[b, t]])
            row_ent.append(-(lsm.exp() * lsm).sum())
        ref_logp.append(torch.stack(row_lp))
        ref_ent.append(torch.stack(row_ent))
    ref_logp, ref_ent = torch.stack(ref_logp), torch.stack(ref_ent)
    (g_ref,) = torch.autograd.grad((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum(), logits)
    # fp32 inside (what the trainer uses), so compare at fp32 precision
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    # The vocab-parallel entry point with no group is the same computation.
    lp2, _ = compute_vocab_parallel_logprobs_and_entropy(
        logits, tokens, tp_group=None, temperature=0.7
    )
    torch.testing.assert_close(lp2, logp)


def test_shape_and_kl_errors():
    logp, old, ref, adv, mask = _random_batch(B=2, T=3)
    with pytest.raises(ValueError, match="shapes"):
        compute_grpo_loss(logp, old, ref, adv[:1], mask, normaliser=1.0)
    with pytest.raises(ValueError, match="ref_logp_BT"):
        compute_grpo_loss(logp, old, None, adv, mask, kl_beta=0.1, normaliser=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        compute_loss_normaliser(mask, aggregation="sum")
    # A batch without valid tokens gives loss 0, not NaN.
    loss, _ = compute_grpo_loss(
        logp, None, ref, adv, torch.zeros_like(mask), kl_beta=0.1,
        normaliser=compute_loss_normaliser(torch.zeros_like(mask), aggregation="token_mean"),
    )  # fmt: skip
    assert loss.item() == 0.0


def test_log_ratio_and_k3_argument_are_clamped_at_20():
    """Moves of e^30 are clamped to e^20 (finite in fp32, no NaN); the clamped tokens carry no
    gradient through the ratio; inside the clamp nothing changes."""
    logp = torch.tensor([[30.0, -30.0, 0.5]], requires_grad=True)
    old = torch.zeros(1, 3)
    ref = torch.tensor([[-30.0, 30.0, 0.0]])  # k3's d = ref - logp = [-60, 60, -0.5]
    loss, m = compute_grpo_loss(
        logp, old, ref, torch.tensor([-1.0]), torch.ones(1, 3),
        clip_eps_low=10.0, clip_eps_high=1e12, kl_beta=1.0, normaliser=3.0,
    )  # fmt: skip
    assert torch.isfinite(loss)
    loss.backward()
    assert float(m["ratio_max"]) == pytest.approx(math.exp(20.0), rel=1e-6)
    assert float(m["ratio_min"]) == pytest.approx(math.exp(-20.0), rel=1e-6)
    kl = compute_kl(logp.detach(), ref, "k3")
    expected = [math.exp(-20) + 20 - 1, math.exp(20) - 20 - 1, math.exp(-0.5) + 0.5 - 1]
    torch.testing.assert_close(kl[0], torch.tensor(expected), rtol=1e-6, atol=0)
    # Clamped tokens: no gradient from the ratio nor from k3; the unclamped one keeps both
    # (-A r + (e^d - d - 1) with d = -logp: d/dlogp = r - e^d + 1 at r = e^0.5, d = -0.5).
    g = logp.grad[0] * 3.0
    assert g[0] == 0 and g[1] == 0
    assert float(g[2]) == pytest.approx(math.exp(0.5) - math.exp(-0.5) + 1.0, rel=1e-6)
