"""The GRPO controller: one call per phase, reading like the algorithm.

    step(items):
        rollouts   = generate(items)                 # G samples per prompt, KV-cached, same model
        handle     = rewards.submit(rollouts)        # rule scores now, judge scores in background
        batch      = build_batch(rollouts)
        ref_logp   = reference_logprobs(batch)       # overlaps with the judge calls
        rewards    = handle.result()                 # first point that waits on the judge
        adv        = group_advantages(rewards)
        update(batch, adv)                           # clipped surrogate + k3 KL, one optimizer step

Data parallelism: each DP rank gets its own prompts from the loader; groups never span ranks, so
advantages are rank-local. Within a model-parallel group every rank sees the same prompts and
generates the same tokens; only its first rank talks to the reward service and broadcasts the
rewards, so the judge is asked once per sample.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vcap.rl.advantages import compute_group_advantages
from megatron_vcap.rl.engine import (
    GRPO_STEP_REDUCTIONS,
    grpo_loss_fn,
    logprob_loss_fn,
    reduce_microbatch_metrics,
    run_microbatches,
)
from megatron_vcap.rl.losses import compute_loss_normaliser
from megatron_vcap.rl.policy import (
    PromptBuilder,
    decode_responses,
    sequence_multiple,
)
from megatron_vcap.rl.records import Rollout, build_train_batch
from megatron_vcap.trainer.metrics import Metric, gather_rank_metrics
from megatron_vcap.trainer.metrics_log import PhaseTimer
from megatron_vcap.trainer.optim import optimizer_step, zero_grads


@dataclass
class RolloutBatch:
    """The generated samples of one step on this rank, in (prompt, sample) order."""

    items: list  # loader items, one per prompt
    prompts: list  # PromptSpec per prompt
    outputs: list  # GenerationOutput per sample
    texts: list[str]


class GRPOController:
    """One GRPO step per call (see the module docstring); the phases are public for tests."""

    def __init__(
        self, cfg, ctx, bundle, reference, tokenizer, prompt_builder: PromptBuilder, reward_service
    ):
        self.cfg = cfg
        self.ctx = ctx
        self.bundle = bundle
        self.reference = reference
        self.tokenizer = tokenizer
        self.prompts = prompt_builder
        self.rewards = reward_service
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.rollout_log_dir = Path(cfg.train.run_dir) / "rollouts" if cfg.train.run_dir else None
        self._rollout_seed = cfg.train.seed * 1000 + ctx.dp_rank

    # -- phases ------------------------------------------------------------------------------

    def generate(self, items, step: int) -> RolloutBatch:
        from megatron_vcap.rollout.generate import generate

        specs = [self.prompts.prompt_spec(item) for item in items]
        sampling = self.prompts.sampling_params(
            self.cfg.rollout, greedy_anchor=self.cfg.grpo.greedy_anchor
        )
        model = self.bundle.model
        model.eval()
        outputs = []
        chunk = self.cfg.rollout.prompts_per_batch  # bounds the KV cache: chunk x G rows
        with torch.no_grad():
            for start in range(0, len(specs), chunk):
                part = generate(
                    model,
                    specs[start : start + chunk],
                    sampling=sampling,
                    group_size=self.cfg.grpo.group_size,
                    decode_fn=self.prompts.decode,
                    seed=self._rollout_seed + 7919 * step + start,
                    share_prefix=self.cfg.rollout.share_prefix,
                    tp_group=self.ctx.tp_group,
                    pp_group=self.ctx.pp_group,
                    # The train-rollout log-prob gap (and grpo.tis_cap) compare against these.
                    return_logprobs=True,
                )
                for out in part:
                    out.prompt_index += start
                outputs.extend(part)
        model.train()
        texts = decode_responses(self.tokenizer, outputs)
        return RolloutBatch(items, specs, outputs, texts)

    def submit_rewards(self, rollouts: RolloutBatch):
        """Send every sample to the reward service (model-parallel leader only)."""
        if not self._is_mp_leader():
            return None
        requests = self.prompts.reward_requests(rollouts.items, rollouts.outputs, rollouts.texts)
        return self.rewards.submit(requests)

    def build_batch(self, rollouts: RolloutBatch):
        """Padded prompt + response rows; advantages are filled in once rewards arrive."""
        records = [
            Rollout.from_generation(
                out,
                rollouts.prompts[out.prompt_index],
                f"{rollouts.items[out.prompt_index].sample.id}/{out.sample_index}",
                text,
            )
            for out, text in zip(rollouts.outputs, rollouts.texts)
        ]
        adv_B = torch.zeros(len(records))
        return build_train_batch(
            records,
            rollouts.prompts,
            adv_B,
            pad_token_id=self.prompts.pad_token_id,
            pad_to_multiple_of=sequence_multiple(self.cfg.model),
        )

    def old_logprobs(self, micro_batches) -> None:
        """Log-probs of the sampling policy, needed when one batch feeds several updates."""
        self._logprob_pass(self.bundle.model, micro_batches, "old_logp_BT")

    def reference_logprobs(self, micro_batches) -> None:
        if self.cfg.grpo.kl_beta <= 0:
            return
        with self.reference.on_device() as ref_model:
            self._logprob_pass(ref_model, micro_batches, "ref_logp_BT")

    def _logprob_pass(self, model, micro_batches, field: str) -> None:
        """Forward-only pass storing each micro-batch's token log-probs in ``mb.<field>``."""
        loss_fn = logprob_loss_fn(
            tp_group=self.ctx.tp_group, temperature=self.temperature, key="logp"
        )
        with torch.no_grad():
            outputs = run_microbatches(
                model, micro_batches, loss_fn, forward_only=True, **self._packing()
            )
        if self.ctx.is_last_stage:
            for mb, out in zip(micro_batches, outputs):
                setattr(mb, field, out["logp"])

    def collect_rewards(self, handle, num_samples: int):
        """Wait for the judge; broadcast (reward, valid) over the model-parallel group.

        ``valid`` is the reward service's drop policy (``loss_mask``: judge failures leave the
        loss under ``reward.on_judge_failure: drop``)."""
        rewards_B = torch.zeros(num_samples, dtype=torch.float64)
        valid_B = torch.ones(num_samples, dtype=torch.float64)
        results = None
        if handle is not None:
            from megatron_vcap.rewards.service import loss_mask

            results = handle.result()
            rewards_B[:] = torch.tensor([r.total for r in results], dtype=torch.float64)
            keep = loss_mask(results, self.cfg.reward.on_judge_failure)
            valid_B[:] = torch.tensor(keep, dtype=torch.float64)
        group = self._mp_group()
        if group is not None:
            src = dist.get_global_rank(group, 0)
            packed = torch.stack([rewards_B, valid_B]).to(self.ctx.device)
            dist.broadcast(packed, src=src, group=group)
            rewards_B, valid_B = packed.cpu()
        return rewards_B.float(), valid_B.bool(), results

    def update(self, micro_batches, *, first: bool = True) -> dict[str, float]:
        """One policy update: gradients of the global-batch loss, then an optimizer step;
        ``first`` (the batch's first update) logs the log-prob gap."""
        metrics = self.accumulate_gradients(micro_batches, first=first)
        metrics.update(optimizer_step(self.bundle))
        return metrics

    def accumulate_gradients(self, micro_batches, *, first: bool = True) -> dict[str, float]:
        """Fresh gradients of the GRPO loss over the global batch (this rank's micro-batches and
        every data-parallel rank's), reduced over data-parallel ranks by Megatron's DDP."""
        grpo = self.cfg.grpo
        normaliser = compute_loss_normaliser(
            [mb.loss_mask_BT for mb in micro_batches],
            aggregation=grpo.loss_aggregation,
            group=self.ctx.dp_cp_group,
        )
        zero_grads(self.bundle)
        loss_fn = grpo_loss_fn(
            grpo,
            tp_group=self.ctx.tp_group,
            temperature=self.temperature,
            normaliser=normaliser,
            # No CP factor: Megatron's schedule already multiplies the loss by the CP size
            # (context_parallel_size > 1 is refused by validate_job until CP is built).
            undo_averaging=len(micro_batches) * self.ctx.dp_size,
            log_gap=first,
        )
        outputs = run_microbatches(
            self.bundle.ddp_model, micro_batches, loss_fn, forward_only=False, **self._packing()
        )
        return reduce_microbatch_metrics(outputs, GRPO_STEP_REDUCTIONS)

    # -- the step ----------------------------------------------------------------------------

    def step(self, items, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        with timer.phase("rollout"):
            t0 = time.perf_counter()
            rollouts = self.generate(items, step)
            gen_seconds = time.perf_counter() - t0
        handle = self.submit_rewards(rollouts)
        metrics, results = self.train_on(
            rollouts, lambda n: self.collect_rewards(handle, n), timer, step=step
        )
        resp_tokens = sum(o.num_tokens for o in rollouts.outputs)
        # Generation throughput of one data-parallel replica, averaged over replicas.
        metrics["tokens_per_s"] = Metric(resp_tokens / max(gen_seconds, 1e-9), "mean")
        if results is not None:
            from megatron_vcap.rewards.service import summarize_results

            metrics.update({f"reward/{k}": v for k, v in summarize_results(results).items()})
        return gather_rank_metrics(metrics, self.ctx)

    def train_on(self, rollouts: RolloutBatch, collect, timer: PhaseTimer, *, step: int):
        """Reference pass, rewards (``collect(num_samples) -> (rewards_B, valid_B, results)``),
        advantages and one policy update on ``rollouts``; returns (metrics, reward results)."""
        grpo = self.cfg.grpo
        batch = self.build_batch(rollouts)
        micro_batches = batch.micro_batches(
            self.cfg.train.micro_batch_size, multiple=sequence_multiple(self.cfg.model)
        )
        if grpo.updates_per_batch > 1:
            # With one update per batch the ratio is exactly 1 and this pass is skipped.
            with timer.phase("old_logp"):
                self.old_logprobs(micro_batches)
        with timer.phase("ref_logp"):
            self.reference_logprobs(micro_batches)
        with timer.phase("reward_wait"):
            rewards_B, valid_B, results = collect(batch.num_samples)
        adv_B, adv_metrics = compute_group_advantages(
            rewards_B, group_size=grpo.group_size, scale_by_std=grpo.scale_by_std, valid_B=valid_B
        )
        start = 0
        for mb in micro_batches:
            rows = slice(start, start + mb.num_samples)
            mb.adv_B = adv_B[rows].float()
            mb.loss_mask_BT = mb.loss_mask_BT * valid_B[rows].float()[:, None]
            start += mb.num_samples
        with timer.phase("update"):
            gap = {}
            for i in range(grpo.updates_per_batch):
                metrics = self.update(micro_batches, first=i == 0)
                if i == 0:
                    gap = {k: v for k, v in metrics.items() if k.startswith("rollout/logp_gap")}
            metrics.update(gap)
        self._log_rollouts(rollouts, rewards_B, adv_B, valid_B, step)
        metrics.update({f"adv/{k}": v for k, v in adv_metrics.items()})
        n_out = len(rollouts.outputs)
        metrics["response_len"] = Metric(
            sum(o.num_tokens for o in rollouts.outputs) / max(n_out, 1), "weighted_mean", n_out
        )
        metrics.update(timer.as_metrics())
        return metrics, results

    def _log_rollouts(self, rollouts: RolloutBatch, rewards_B, adv_B, valid_B, step: int):
        """One JSON line per sample in ``<run_dir>/rollouts/dp_rank_XXX.jsonl`` (TP rank 0)."""
        if self.rollout_log_dir is None or self.ctx.tp_rank != 0 or self.ctx.pp_rank != 0:
            return
        self.rollout_log_dir.mkdir(parents=True, exist_ok=True)
        path = self.rollout_log_dir / f"dp_rank_{self.ctx.dp_rank:03d}.jsonl"
        with open(path, "a") as f:
            for i, (out, text) in enumerate(zip(rollouts.outputs, rollouts.texts)):
                sample = rollouts.items[out.prompt_index].sample
                f.write(
                    json.dumps(
                        {
                            "step": step + 1,
                            "sample_id": sample.id,
                            "sample_index": out.sample_index,
                            "reward": float(rewards_B[i]),
                            "advantage": float(adv_B[i]),
                            "valid": bool(valid_B[i]),
                            "finish_reason": out.finish_reason,
                            "response": text,
                        }
                    )
                    + "\n"
                )

    # -- helpers -----------------------------------------------------------------------------

    def _packing(self) -> dict:
        return dict(pack=self.cfg.train.pack_sequences, multiple=sequence_multiple(self.cfg.model))

    def _mp_group(self):
        if self.ctx.tp_size * self.ctx.pp_size == 1:
            return None
        return self.ctx.mp_group

    def _is_mp_leader(self) -> bool:
        return self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0
