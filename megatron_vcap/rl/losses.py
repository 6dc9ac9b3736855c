"""GRPO policy loss, KL estimators, and token log-probs / entropy from (vocab-parallel) logits.

The loss of one micro-batch is its *contribution* to the loss of the whole global batch: the
per-token terms are summed and divided by a ``normaliser`` that the caller computes once for the
global batch (all micro-batches on all data-parallel ranks, :func:`compute_loss_normaliser`).
Summing the contributions therefore gives the same loss and gradients however the batch is cut
into micro-batches or spread over ranks. A framework that averages over micro-batches or ranks
(Megatron's schedule divides by the number of micro-batches; DDP averages over data-parallel
ranks) must have that averaging undone by the caller.

Shape legend: B = sequences, T = tokens, V = vocabulary (full), v = this rank's vocabulary shard.
``logp_BT[b, t]`` is the log-probability of ``tokens_BT[b, t]``; ``mask_BT`` is 1 on the tokens
that are trained on (response tokens), 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "AGGREGATIONS",
    "GRPO_METRIC_REDUCTIONS",
    "KL_ESTIMATORS",
    "compute_grpo_loss",
    "compute_kl",
    "compute_loss_normaliser",
    "compute_sequence_logprobs",
    "compute_tis_weights",
    "compute_token_logprobs_and_entropy",
    "compute_vocab_parallel_logprobs_and_entropy",
]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
# Every exponential of a log-prob difference in this file sees its argument clamped to [-20, 20]:
# the policy ratio exp(logp - old_logp), k3's exp(ref_logp - logp) and the truncated importance
# weight exp(old_logp - sampler_logp). A token whose probability moved by more
# than e^20 (~5e8) is an outlier whose exp() would otherwise reach inf in fp32 (e^89) and turn the
# whole batch's loss and gradients into NaN. Inside the clamp the gradient is exact; beyond it the
# clamped term is constant (zero gradient through that token's ratio / k3 term).
LOG_RATIO_CLAMP = 20.0

# How each metric of compute_grpo_loss merges over micro-batches and data-parallel ranks
# (trainer/metrics.py): means are token-weighted by ``num_tokens``.
GRPO_METRIC_REDUCTIONS = {
    "num_tokens": "sum",
    "pg_loss": "weighted_mean",
    "clip_frac": "weighted_mean",
    "ratio_mean": "weighted_mean",
    "ratio_max": "max",
    "ratio_min": "min",
    "kl_mean": "weighted_mean",
    "entropy_mean": "weighted_mean",
}


def compute_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(d) - d - 1 with d = ref - logp
    (unbiased and non-negative; Schulman's estimator, the GRPO default). k3's ``d`` is clamped
    to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (see there); k1 and k2 need no clamp.
    """
    if estimator == "k1":
        return logp_BT - ref_logp_BT
    if estimator == "k2":
        return 0.5 * (logp_BT - ref_logp_BT) ** 2
    if estimator == "k3":
        delta = (ref_logp_BT - logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"kl_estimator: expected one of {list(KL_ESTIMATORS)}, got {estimator!r}")


def _aggregate(
    value_BT: torch.Tensor, mask_BT: torch.Tensor, aggregation: str, normaliser
) -> torch.Tensor:
    masked_BT = value_BT * mask_BT
    if aggregation == "token_mean":
        total = masked_BT.sum()
    elif aggregation == "seq_mean_token_mean":
        total = (masked_BT.sum(-1) / mask_BT.sum(-1).clamp(min=1)).sum()
    elif aggregation == "seq_mean_token_sum":
        total = masked_BT.sum()
    else:
        raise ValueError(f"aggregation: expected one of {list(AGGREGATIONS)}, got {aggregation!r}")
    return total / normaliser


def compute_loss_normaliser(
    masks: torch.Tensor | Sequence[torch.Tensor],
    *,
    aggregation: str,
    group: dist.ProcessGroup | None = None,
) -> float:
    """The global normaliser for :func:`compute_grpo_loss`.

    ``masks`` are this rank's loss masks (one mask_BT, or one per micro-batch); the count is
    summed over ``group`` (the data-parallel group) when given. token_mean counts valid tokens;
    the sequence-level modes count sequences with at least one valid token. Never below 1, so
    a batch without any valid token gives loss 0 instead of NaN.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {list(AGGREGATIONS)}, got {aggregation!r}")
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    count = torch.zeros((), dtype=torch.float64)
    for mask_BT in masks:
        valid_BT = mask_BT.detach().to(torch.float64)
        if aggregation == "token_mean":
            count = count + valid_BT.sum().cpu()
        else:
            count = count + (valid_BT.sum(-1) > 0).sum().cpu()
    if group is not None and dist.get_world_size(group) > 1:
        device = masks[0].device if masks else torch.device("cpu")
        count = count.to(device)
        dist.all_reduce(count, group=group)
    return max(float(count), 1.0)


def compute_grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor | None,
    ref_logp_BT: torch.Tensor | None,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    normaliser: float,
    entropy_BT: torch.Tensor | None = None,
    tis_weight_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss with a KL penalty to the reference policy.

    Per token: ``w * max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + kl_beta * KL`` with
    ``r = exp(logp - old_logp)`` and ``w = tis_weight_BT`` (truncated importance weights of the
    trainer's old policy over the sampler, :func:`compute_tis_weights`; 1 when not given). ``old_logp_BT=None`` means one update per rollout batch:
    ``r = exp(logp - logp.detach())`` is 1 with the policy-gradient gradient. ``logp - old_logp``
    is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp(). The per-token terms are
    reduced by ``aggregation`` and divided by ``normaliser`` (see the module docstring).

    Returns ``(loss, metrics)``; metrics are detached 0-d tensors averaged over this
    micro-batch's valid tokens (``num_tokens`` is their weight across micro-batches and ranks,
    ``GRPO_METRIC_REDUCTIONS`` how each merges). Without any valid token there is no ratio to
    report: ``ratio_max`` / ``ratio_min`` are then left out rather than reported as 1.
    """
    if logp_BT.shape != mask_BT.shape or adv_B.shape != logp_BT.shape[:1]:
        raise ValueError(
            f"shapes: logp {tuple(logp_BT.shape)}, mask {tuple(mask_BT.shape)}, "
            f"adv {tuple(adv_B.shape)} do not line up as [B, T], [B, T], [B]"
        )
    if kl_beta > 0 and ref_logp_BT is None:
        raise ValueError("kl_beta > 0 needs ref_logp_BT (the reference policy's log-probs)")
    mask_BT = mask_BT.to(logp_BT.dtype)
    old_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT.detach()
    log_ratio_BT = (logp_BT - old_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = adv_B.detach().to(logp_BT.dtype)[:, None]
    surr_BT = -adv_B1 * ratio_BT
    surr_clipped_BT = -adv_B1 * ratio_BT.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg_BT = torch.maximum(surr_BT, surr_clipped_BT)
    if tis_weight_BT is not None:
        pg_BT = pg_BT * tis_weight_BT.detach().to(pg_BT.dtype)
    per_token_BT = pg_BT
    kl_BT = None
    if ref_logp_BT is not None and kl_beta > 0:
        kl_BT = compute_kl(logp_BT, ref_logp_BT.detach(), kl_estimator)
        per_token_BT = per_token_BT + kl_beta * kl_BT
    loss = _aggregate(per_token_BT, mask_BT, aggregation, normaliser)

    with torch.no_grad():
        n = mask_BT.sum()
        denom = n.clamp(min=1)
        valid_ratio = ratio_BT[mask_BT > 0]

        def mean(x_BT):
            return (x_BT * mask_BT).sum() / denom

        metrics = {
            "num_tokens": n,
            "pg_loss": mean(pg_BT),
            # Tokens where the clipped branch is active (their gradient is zero).
            "clip_frac": mean((surr_clipped_BT > surr_BT).to(mask_BT.dtype)),
            "ratio_mean": mean(ratio_BT),
        }
        if valid_ratio.numel():
            metrics["ratio_max"] = valid_ratio.max()
            metrics["ratio_min"] = valid_ratio.min()
        if kl_BT is not None:
            metrics["kl_mean"] = mean(kl_BT)
        elif ref_logp_BT is not None:
            metrics["kl_mean"] = mean(compute_kl(logp_BT, ref_logp_BT, kl_estimator))
        if entropy_BT is not None:
            metrics["entropy_mean"] = mean(entropy_BT)
    return loss, {k: v.detach() for k, v in metrics.items()}


def compute_tis_weights(
    old_logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, *, cap: float
) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old_logp - sampler_logp), cap)``, detached.

    The rollout engine samples from its own numerics (e.g. a bf16 KV-cached decode) while the
    surrogate's ratio is taken against the trainer's full forward of the same weights; the
    weight corrects the policy gradient for that mismatch, truncated at ``cap`` to bound the
    variance (truncated importance sampling). The log-ratio is clamped like the policy ratio.
    """
    if cap <= 0:
        raise ValueError(f"cap: must be > 0, got {cap}")
    log_w_BT = (old_logp_BT.detach() - sampler_logp_BT.detach()).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    return torch.exp(log_w_BT).clamp(max=cap)


class _LogProbEntropy(torch.autograd.Function):
    """Log-softmax of the target token and the entropy, over a vocabulary that may be sharded.

    Forward reduces max, partition function, target logit and E[logit] over ``group``; backward
    needs no communication: d logp / d l_v = 1[v = target] - p_v and
    d H / d l_v = -p_v (l_v - E[l]), both local once logZ and E[l] are known.
    """

    @staticmethod
    def forward(ctx, logits_BTv, tokens_BT, group):
        logits = logits_BTv.float()
        vocab_local = logits.size(-1)
        start = vocab_local * dist.get_rank(group) if group is not None else 0

        def all_reduce(x, op=dist.ReduceOp.SUM):
            if group is not None:
                dist.all_reduce(x, op=op, group=group)
            return x

        max_BT = all_reduce(logits.max(-1).values, dist.ReduceOp.MAX)
        shifted_BTv = logits - max_BT.unsqueeze(-1)
        exp_BTv = shifted_BTv.exp()
        sum_BT = all_reduce(exp_BTv.sum(-1))
        in_shard_BT = (tokens_BT >= start) & (tokens_BT < start + vocab_local)
        local_idx_BT = (tokens_BT - start).clamp(0, vocab_local - 1)
        target_BT = shifted_BTv.gather(-1, local_idx_BT.unsqueeze(-1)).squeeze(-1)
        target_BT = all_reduce(torch.where(in_shard_BT, target_BT, torch.zeros_like(target_BT)))
        log_sum_BT = sum_BT.log()
        logp_BT = target_BT - log_sum_BT
        # E[l - max] under p, so the entropy is computed from shifted logits (no overflow).
        mean_shifted_BT = all_reduce((exp_BTv * shifted_BTv).sum(-1)) / sum_BT
        entropy_BT = log_sum_BT - mean_shifted_BT
        ctx.save_for_backward(shifted_BTv, log_sum_BT, mean_shifted_BT, local_idx_BT, in_shard_BT)
        ctx.in_dtype = logits_BTv.dtype
        return logp_BT, entropy_BT

    @staticmethod
    def backward(ctx, grad_logp_BT, grad_entropy_BT):
        shifted_BTv, log_sum_BT, mean_shifted_BT, local_idx_BT, in_shard_BT = ctx.saved_tensors
        p_BTv = (shifted_BTv - log_sum_BT.unsqueeze(-1)).exp()
        grad_BTv = -p_BTv * grad_logp_BT.unsqueeze(-1)
        grad_BTv -= (
            grad_entropy_BT.unsqueeze(-1) * p_BTv * (shifted_BTv - mean_shifted_BT.unsqueeze(-1))
        )
        onehot_BT = torch.where(in_shard_BT, grad_logp_BT, torch.zeros_like(grad_logp_BT))
        grad_BTv.scatter_add_(-1, local_idx_BT.unsqueeze(-1), onehot_BT.unsqueeze(-1))
        return grad_BTv.to(ctx.in_dtype), None, None


def compute_token_logprobs_and_entropy(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BT, entropy_BT)`` in fp32 from full-vocabulary logits, differentiable in both.

    ``logits_BTV[b, t]`` must be the logits that predict ``tokens_BT[b, t]`` (i.e. the model's
    output at position t - 1: pass ``logits[:, :-1]`` with ``tokens[:, 1:]``). ``temperature``
    divides the logits first, matching the sampler's distribution.
    """
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    return _LogProbEntropy.apply(logits_BTV, tokens_BT, None)


def compute_vocab_parallel_logprobs_and_entropy(
    logits_BTv: torch.Tensor,
    tokens_BT: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`compute_token_logprobs_and_entropy` for logits sharded over the vocabulary.

    ``logits_BTv`` is this tensor-parallel rank's contiguous vocabulary shard (Megatron's output
    layer without gathering: rank r holds ids ``[r v, (r + 1) v)``); ``tokens_BT`` hold full-vocab
    ids. Every rank of ``tp_group`` gets the full log-probs and entropies; gradients flow to each
    rank's own shard. ``tp_group=None`` or of size 1 is the unsharded case.
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    if temperature != 1.0:
        logits_BTv = logits_BTv / temperature
    return _LogProbEntropy.apply(logits_BTv, tokens_BT, tp_group)


def compute_sequence_logprobs(
    logits_BTV: torch.Tensor,
    tokens_BT: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BT, entropy_BT)`` aligned with ``tokens_BT`` from the model's logits over it.

    The model's output at position t predicts token t + 1, so column 0 (no context) is 0 in both
    outputs; this is the layout of ``TrainBatch.ref_logp_BT`` / ``old_logp_BT``. ``logits_BTV``
    may be this rank's vocabulary shard when ``tp_group`` is given.
    """
    logp_BT1, entropy_BT1 = compute_vocab_parallel_logprobs_and_entropy(
        logits_BTV[:, :-1], tokens_BT[:, 1:], tp_group=tp_group, temperature=temperature
    )
    pad_B1 = logp_BT1.new_zeros(logp_BT1.size(0), 1)
    return torch.cat([pad_B1, logp_BT1], dim=1), torch.cat([pad_B1, entropy_BT1], dim=1)
