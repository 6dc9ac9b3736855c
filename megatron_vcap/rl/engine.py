"""Forward / backward over micro-batches through Megatron's schedules, and loss closures.

Every pass over model weights in the trainer (policy update, reference and old log-probs, SFT)
goes through :func:`run_microbatches`, which hands Megatron's ``get_forward_backward_func`` the
micro-batches, so pipeline parallelism and gradient reduction behave as in any Megatron run.
Loss closures return the *global-batch contribution* of a micro-batch (see ``rl/losses.py``);
Megatron's schedule divides by the number of micro-batches and DDP averages over data-parallel
ranks, so the closures multiply both back (``undo_averaging``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from megatron_vcap.rl.losses import (
    GRPO_METRIC_REDUCTIONS,
    compute_grpo_loss,
    compute_sequence_logprobs,
    compute_tis_weights,
)
from megatron_vcap.rl.packing import PackedRows, pack_rows, unpack_BT
from megatron_vcap.rl.records import TrainBatch
from megatron_vcap.trainer.metrics import Metric, merge_metrics

# The loss closures' metrics and their reductions (weighted_mean: by the micro-batch's
# num_tokens). ``loss`` is each micro-batch's contribution to the global-batch loss, so it sums.
GRPO_STEP_REDUCTIONS = {
    **GRPO_METRIC_REDUCTIONS,
    "loss": "sum",
    "rollout/logp_gap_mean": "weighted_mean",
    "rollout/logp_gap_max": "max",
    "tis_weight_mean": "weighted_mean",
}
SFT_STEP_REDUCTIONS = {"loss": "sum", "num_tokens": "sum", "nll_mean": "weighted_mean"}


def model_vision_kwargs(mb: TrainBatch) -> dict[str, torch.Tensor]:
    """The model's vision inputs for a micro-batch.

    When every prompt holds exactly one video (GRPO and SFT prompts do), each distinct video is
    passed once with ``video_index`` mapping rows to it, so the G samples of a prompt share one
    vision-tower pass. Otherwise each row's inputs are concatenated in row order.
    """
    if mb.vision and all(
        set(v) == {"pixel_values_videos", "video_grid_thw"} and v["video_grid_thw"].shape[0] == 1
        for v in mb.vision
    ):
        return {
            "pixel_values_videos": torch.cat([v["pixel_values_videos"] for v in mb.vision]),
            "video_grid_thw": torch.cat([v["video_grid_thw"] for v in mb.vision]),
            "video_index": mb.prompt_index_B,
        }
    per_row = mb.vision_for_rows()
    keys = sorted({k for v in per_row for k in v})
    return {key: torch.cat([v[key] for v in per_row if key in v], dim=0) for key in keys}


def _pack_multiple(config, multiple: int) -> int:
    """Packed length multiple: ``multiple`` (FP8), and the TP size under sequence parallelism
    (the sequence is split over the tensor-parallel ranks)."""
    if getattr(config, "sequence_parallel", False):
        return math.lcm(multiple, config.tensor_model_parallel_size)
    return multiple


def run_microbatches(
    model,
    micro_batches: Sequence[TrainBatch],
    loss_fn: Callable[..., tuple[torch.Tensor, dict]],
    *,
    forward_only: bool,
    pack: bool = False,
    multiple: int = 1,
) -> list[dict]:
    """Run the schedule; returns the loss closures' metric dicts (last pipeline stage only).

    ``pack``: each micro-batch's rows run as one THD-packed sequence (``rl/packing.py``; its
    length padded to ``multiple``); the closures get ``packed=`` and unpack their log-probs.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    config = getattr(model, "config", None) or model.module.config
    multiple = _pack_multiple(config, multiple)
    packs = {}
    if pack:
        packs = {
            id(mb): pack_rows(mb.tokens_BT, mb.position_ids_3BT, mb.seq_len_B, multiple=multiple)
            for mb in micro_batches
        }

    def forward_step(data_iterator, model_chunk):
        # Batches are assembled on the host; the loss closure sees the moved copy too.
        host_mb = next(data_iterator)
        mb = host_mb.to(device)
        if not pack:
            output = model_chunk(
                mb.tokens_BT,
                mb.position_ids_3BT,
                None,
                runtime_gather_output=False,
                **model_vision_kwargs(mb),
            )
            return output, functools.partial(loss_fn, mb)
        packed = packs[id(host_mb)].to(device)
        output = model_chunk(
            packed.tokens_1N,
            packed.position_ids_31N,
            None,
            runtime_gather_output=False,
            packed_seq_params=packed.params,
            **model_vision_kwargs(mb),
        )
        return output, functools.partial(loss_fn, mb, packed=packed)

    if pack:
        seq_len, mbs = max(p.tokens_1N.shape[1] for p in packs.values()), 1
    else:
        seq_len = max(mb.tokens_BT.shape[1] for mb in micro_batches)
        mbs = max(mb.tokens_BT.shape[0] for mb in micro_batches)
    # Rows differ in length between micro-batches; pipeline p2p must then exchange shapes.
    config.variable_seq_lengths = True
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def token_logprobs(
    mb: TrainBatch,
    logits_BTv: torch.Tensor,
    *,
    tp_group,
    temperature: float,
    packed: PackedRows | None = None,
):
    """(logp_BT, entropy_BT) aligned with ``mb.tokens_BT`` from vocab-parallel logits.

    With ``packed``, ``logits_BTv`` are the packed sequence's [1, N, v]; the log-probs are
    computed there (N tokens, not B x T) and scattered back to [B, T].
    """
    if packed is None:
        return compute_sequence_logprobs(
            logits_BTv.float(), mb.tokens_BT, tp_group=tp_group, temperature=temperature
        )
    logp_1N, entropy_1N = compute_sequence_logprobs(
        logits_BTv.float(), packed.tokens_1N, tp_group=tp_group, temperature=temperature
    )
    return unpack_BT(logp_1N, packed), unpack_BT(entropy_1N, packed)


def logprob_loss_fn(*, tp_group, temperature: float, key: str):
    """Forward-only closure that stores each micro-batch's target log-probs under ``key``."""

    def loss_fn(mb: TrainBatch, logits_BTv: torch.Tensor, packed=None):
        logp_BT, _ = token_logprobs(
            mb, logits_BTv, tp_group=tp_group, temperature=temperature, packed=packed
        )
        return torch.zeros((), device=logp_BT.device), {key: logp_BT.detach()}

    return loss_fn


def compute_logp_gap(
    logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, mask_BT: torch.Tensor
) -> dict[str, torch.Tensor]:
    """|trainer logp - sampler logp| over the masked tokens: its mean and max (0 when none).

    On the first update the trainer's weights are the ones that sampled, so any gap is the
    numerics of the two engines (bf16 KV-cached decode vs the full training forward).
    """
    gap_BT = (logp_BT.detach().float() - sampler_logp_BT.float()).abs() * (mask_BT > 0)
    n = (mask_BT > 0).sum().clamp(min=1)
    return {
        "rollout/logp_gap_mean": gap_BT.sum() / n,
        "rollout/logp_gap_max": gap_BT.max() if gap_BT.numel() else gap_BT.new_zeros(()),
    }


def grpo_loss_fn(
    grpo_cfg,
    *,
    tp_group,
    temperature: float,
    normaliser: float,
    undo_averaging,
    log_gap: bool = False,
):
    """Training closure: clipped GRPO loss of one micro-batch, scaled for Megatron's averaging.

    ``log_gap`` (the first update of a rollout batch) adds the train-rollout log-prob gap
    metrics; ``grpo_cfg.tis_cap`` weights the policy-gradient term by truncated importance
    weights of the trainer's old policy over the sampler's.
    """

    def loss_fn(mb: TrainBatch, logits_BTv: torch.Tensor, packed=None):
        logp_BT, entropy_BT = token_logprobs(
            mb, logits_BTv, tp_group=tp_group, temperature=temperature, packed=packed
        )
        tis_weight_BT = None
        if grpo_cfg.tis_cap is not None:
            if mb.sampler_logp_BT is None:
                raise ValueError("grpo.tis_cap: needs the sampler's log-probs in the batch")
            old_BT = logp_BT if mb.old_logp_BT is None else mb.old_logp_BT
            tis_weight_BT = compute_tis_weights(old_BT, mb.sampler_logp_BT, cap=grpo_cfg.tis_cap)
        loss, metrics = compute_grpo_loss(
            logp_BT,
            mb.old_logp_BT,
            mb.ref_logp_BT,
            mb.adv_B,
            mb.loss_mask_BT,
            clip_eps_low=grpo_cfg.clip_eps_low,
            clip_eps_high=grpo_cfg.clip_eps_high,
            kl_beta=grpo_cfg.kl_beta,
            kl_estimator=grpo_cfg.kl_estimator,
            aggregation=grpo_cfg.loss_aggregation,
            normaliser=normaliser,
            entropy_BT=entropy_BT.detach(),
            tis_weight_BT=tis_weight_BT,
        )
        if log_gap and mb.sampler_logp_BT is not None:
            metrics.update(compute_logp_gap(logp_BT, mb.sampler_logp_BT, mb.loss_mask_BT))
        if tis_weight_BT is not None:
            valid_BT = mb.loss_mask_BT > 0
            metrics["tis_weight_mean"] = (tis_weight_BT * valid_BT).sum() / valid_BT.sum().clamp(
                min=1
            )
        metrics["loss"] = loss.detach()
        return loss * undo_averaging, metrics

    return loss_fn


def sft_loss_fn(*, tp_group, normaliser: float, undo_averaging):
    """Token-mean cross-entropy over the global batch's target tokens."""

    def loss_fn(mb: TrainBatch, logits_BTv: torch.Tensor, packed=None):
        logp_BT, _ = token_logprobs(
            mb, logits_BTv, tp_group=tp_group, temperature=1.0, packed=packed
        )
        nll = -(logp_BT * mb.loss_mask_BT).sum()
        loss = nll / normaliser
        n = mb.loss_mask_BT.sum()
        metrics = {
            "loss": loss.detach(),
            "num_tokens": n.detach(),
            "nll_mean": (nll / n.clamp(min=1)).detach(),
        }
        return loss * undo_averaging, metrics

    return loss_fn


def reduce_microbatch_metrics(
    outputs: Sequence[dict], reductions: dict[str, str]
) -> dict[str, Metric]:
    """Merge the loss closures' per-micro-batch metrics by their declared ``reductions``
    (weighted means are weighted by each micro-batch's ``num_tokens``)."""
    parts = []
    for out in outputs:
        tokens = float(out["num_tokens"])
        undeclared = sorted(set(out) - set(reductions))
        if undeclared:
            raise KeyError(f"micro-batch metrics without a declared reduction: {undeclared}")
        parts.append({k: Metric(float(v), reductions[k], tokens) for k, v in out.items()})
    return merge_metrics(parts)
