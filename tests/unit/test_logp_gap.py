"""The train-rollout log-prob gap and the truncated importance-sampling correction (grpo.tis_cap).

The sampler's chosen-token log-probs (KV-cached decode, left-padded prompts) must equal the
training forward's log-probs of the same tokens (one full forward over right-padded rows) in
fp32; the gap metrics must see a gap when there is one; the TIS weights are checked against a
hand computation and their effect on the gradient against the unweighted loss.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_vcap.rl.losses import compute_grpo_loss, compute_tis_weights

VOCAB = 64


def _grpo_cfg(**kw):
    base = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_beta=0.0,
        kl_estimator="k3",
        loss_aggregation="token_mean",
        tis_cap=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _rollout_batch(temperature: float):
    from megatron_vcap.rl.records import Rollout, build_train_batch
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams
    from megatron_vcap.rollout.types import PromptSpec
    from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

    torch.manual_seed(0)
    model = build_tiny_mrope_gpt(TinyGPTConfig(vocab_size=VOCAB, core_attention="sdpa"))
    g = torch.Generator().manual_seed(4)
    prompts = [PromptSpec.from_text_ids(torch.randint(0, VOCAB, (n,), generator=g)) for n in (7, 3)]
    sampling = SamplingParams(temperature=temperature, max_new_tokens=10)
    outs = generate(model, prompts, sampling=sampling, group_size=3, seed=1, return_logprobs=True)
    rollouts = [
        Rollout.from_generation(o, prompts[o.prompt_index], f"{o.prompt_index}/{o.sample_index}")
        for o in outs
    ]
    batch = build_train_batch(rollouts, prompts, torch.randn(len(rollouts), generator=g))
    return model, batch


def _gap_metrics(model, batch, temperature, micro_batch_size=4):
    from megatron_vcap.rl.engine import (
        GRPO_STEP_REDUCTIONS,
        grpo_loss_fn,
        reduce_microbatch_metrics,
        run_microbatches,
    )

    loss_fn = grpo_loss_fn(
        _grpo_cfg(),
        tp_group=None,
        temperature=temperature,
        normaliser=1.0,
        undo_averaging=1,
        log_gap=True,
    )
    with torch.no_grad():
        outs = run_microbatches(
            model, batch.micro_batches(micro_batch_size), loss_fn, forward_only=True
        )
    return reduce_microbatch_metrics(outs, GRPO_STEP_REDUCTIONS)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logp_gap_is_zero_in_fp32(single_rank, temperature):
    model, batch = _rollout_batch(temperature)
    assert batch.sampler_logp_BT is not None
    assert float(batch.sampler_logp_BT.abs().sum()) > 0  # real log-probs, not zeros
    metrics = _gap_metrics(model, batch, temperature)
    assert metrics["rollout/logp_gap_mean"] < 1e-5, metrics
    assert metrics["rollout/logp_gap_max"] < 1e-5, metrics

    # A real gap shows: shift one response token's sampler log-prob by 0.25.
    b, t = (batch.loss_mask_BT > 0).nonzero()[5].tolist()
    batch.sampler_logp_BT[b, t] -= 0.25
    shifted = _gap_metrics(model, batch, temperature)
    assert abs(shifted["rollout/logp_gap_max"] - 0.25) < 1e-4
    num_tokens = float(batch.loss_mask_BT.sum())
    assert abs(shifted["rollout/logp_gap_mean"] - 0.25 / num_tokens) < 1e-5


def test_tis_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5]])
    w = compute_tis_weights(old, sampler, cap=1.5)
    # exp(0.5) = 1.6487 -> capped at 1.5; exp(-1) = 0.3679; exp(0) = 1.
    expected = torch.tensor([[1.5, math.exp(-1.0), 1.0]])
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="cap"):
        compute_tis_weights(old, sampler, cap=0.0)


def test_tis_weights_scale_the_policy_gradient_per_token():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2, 5, generator=g)).requires_grad_(True)
    ref = -torch.rand(2, 5, generator=g)
    adv = torch.tensor([1.0, -0.5])
    mask = torch.ones(2, 5)
    w = torch.rand(2, 5, generator=g) * 2
    kw = dict(kl_beta=0.1, normaliser=10.0)
    loss_w, _ = compute_grpo_loss(logp, None, ref, adv, mask, tis_weight_BT=w, **kw)
    (grad_w,) = torch.autograd.grad(loss_w, logp)
    # Reference: with ratio 1 the pg gradient per token is -A / N; the KL term is unweighted.
    logp2 = logp.detach().clone().requires_grad_(True)
    loss_kl, _ = compute_grpo_loss(
        logp2, None, ref, torch.zeros(2), mask, **kw
    )  # the KL part alone
    (grad_kl,) = torch.autograd.grad(loss_kl, logp2)
    expected = -adv[:, None] * w / 10.0 + grad_kl
    torch.testing.assert_close(grad_w, expected, atol=1e-6, rtol=1e-6)


def test_tis_cap_config():
    from megatron_vcap.config.loader import ConfigError
    from megatron_vcap.rl.config import GRPOConfig

    assert GRPOConfig().tis_cap is None  # off by default
    GRPOConfig(tis_cap=2.0).validate()
    with pytest.raises(ConfigError, match="tis_cap"):
        GRPOConfig(tis_cap=0.0).validate()
