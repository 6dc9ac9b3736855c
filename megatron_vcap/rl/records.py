"""Typed records that flow through a GRPO step: ``Rollout`` (one sampled response) and
``TrainBatch`` (the padded tensors the policy update trains on).

The G rollouts of one prompt share that prompt's vision inputs; a ``TrainBatch`` therefore keeps
the vision inputs once per prompt (``vision``) and maps every row to its prompt
(``prompt_index_B``). Update micro-batches are row slices of a ``TrainBatch``
(:meth:`TrainBatch.micro_batches`), each carrying only the prompts its rows use.

Conventions: rows are right-padded; ``*_logp_BT[b, t]`` is the log-probability of
``tokens_BT[b, t]`` given the tokens before it (column 0 has none and stays 0), and
``loss_mask_BT`` is 1 exactly on the response tokens of valid rollouts. Right padding needs no
attention mask: under causal attention no real token attends to a pad that follows it.

Shape legend: B = rows (samples), T = tokens (prompt + response, padded), S = prompt tokens,
R = response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from megatron_vcap.rollout.types import GenerationOutput, PromptSpec


@dataclass
class Rollout:
    """One sampled response, its prompt and, once scored, its reward."""

    sample_id: str
    group_index: int  # which prompt of the step; the G samples of a prompt share it
    sample_index: int
    prompt_ids_S: torch.Tensor
    response_ids_R: torch.Tensor
    finish_reason: str
    response_text: str = ""
    # Sampler log-probs of the response tokens (diagnostics; not the trainer's old log-probs).
    sampler_logp_R: torch.Tensor | None = None
    reward: float | None = None
    reward_parts: dict[str, float] = field(default_factory=dict)
    # False when scoring failed (e.g. the judge timed out): no advantage, masked out of the loss.
    valid: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_generation(
        cls, out: GenerationOutput, prompt: PromptSpec, sample_id: str, response_text: str = ""
    ) -> Rollout:
        return cls(
            sample_id=sample_id,
            group_index=out.prompt_index,
            sample_index=out.sample_index,
            prompt_ids_S=prompt.input_ids_S,
            response_ids_R=out.response_ids_R,
            finish_reason=out.finish_reason,
            response_text=response_text,
            sampler_logp_R=out.logprobs_R,
        )


@dataclass
class TrainBatch:
    """Padded policy-update inputs for B samples (see the module docstring for conventions)."""

    tokens_BT: torch.Tensor
    position_ids_3BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    adv_B: torch.Tensor
    prompt_index_B: torch.Tensor  # row -> index into ``vision``
    seq_len_B: torch.Tensor  # real (unpadded) length of each row
    vision: list[dict[str, Any]] = field(default_factory=list)
    old_logp_BT: torch.Tensor | None = None
    ref_logp_BT: torch.Tensor | None = None
    # The rollout sampler's log-probs of the response tokens (0 elsewhere), when it gave them.
    sampler_logp_BT: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.tokens_BT.size(0)

    def vision_for_rows(self) -> list[dict[str, Any]]:
        """The vision inputs of each row's prompt (shared objects, not copies)."""
        return [self.vision[i] for i in self.prompt_index_B.tolist()]

    def slice(self, start: int, end: int, trim: bool = True, multiple: int = 1) -> TrainBatch:
        """Rows [start, end), with only the prompts they use; ``trim`` drops all-pad columns
        (keeping the width a multiple of ``multiple``, e.g. 16 for FP8 GEMMs)."""
        rows = slice(start, end)
        used = sorted(set(self.prompt_index_B[rows].tolist()))
        remap = {old: new for new, old in enumerate(used)}
        width = self.tokens_BT.size(1)
        if trim and end > start:
            longest = int(self.seq_len_B[rows].max())
            width = min(width, -(-longest // multiple) * multiple)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "vision":
                out[f.name] = [self.vision[i] for i in used] if self.vision else []
            elif f.name == "prompt_index_B":
                out[f.name] = torch.tensor([remap[i] for i in value[rows].tolist()])
            elif value is None:
                out[f.name] = None
            elif f.name == "position_ids_3BT":
                out[f.name] = value[:, rows, :width]
            elif value.dim() == 2:
                out[f.name] = value[rows, :width]
            else:
                out[f.name] = value[rows]
        return TrainBatch(**out)

    def micro_batches(self, size: int, multiple: int = 1) -> list[TrainBatch]:
        if size < 1:
            raise ValueError(f"micro batch size: must be >= 1, got {size}")
        return [self.slice(i, min(i + size, self.num_samples), multiple=multiple)
                for i in range(0, self.num_samples, size)]  # fmt: skip

    def to(self, device) -> TrainBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def build_train_batch(
    rollouts: list[Rollout],
    prompts: list[PromptSpec],
    adv_B: torch.Tensor,
    *,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> TrainBatch:
    """Pad ``rollouts`` (prompt + response) into a :class:`TrainBatch`.

    ``prompts[r.group_index]`` is each rollout's prompt (its mRoPE positions are continued over
    the response as ``s + rope_delta``); ``adv_B`` follows the order of ``rollouts``. Rows of
    invalid rollouts keep their tokens but get an all-zero loss mask.
    """
    if len(rollouts) != adv_B.numel():
        raise ValueError(f"adv_B: {adv_B.numel()} advantages for {len(rollouts)} rollouts")
    lengths = []
    for r in rollouts:
        prompt = prompts[r.group_index]
        if not torch.equal(prompt.input_ids_S.cpu(), r.prompt_ids_S.cpu()):
            raise ValueError(
                f"rollout {r.sample_id}: prompt ids differ from prompts[{r.group_index}]"
            )
        lengths.append(prompt.length + r.response_ids_R.numel())
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rollouts)
    tokens_BT = torch.full((B, width), pad_token_id, dtype=torch.long)
    position_ids_3BT = torch.zeros(3, B, width, dtype=torch.long)
    loss_mask_BT = torch.zeros(B, width, dtype=torch.float32)
    with_sampler = bool(rollouts) and all(r.sampler_logp_R is not None for r in rollouts)
    sampler_logp_BT = torch.zeros(B, width, dtype=torch.float32) if with_sampler else None
    for b, r in enumerate(rollouts):
        prompt = prompts[r.group_index]
        S, R = prompt.length, r.response_ids_R.numel()
        tokens_BT[b, :S] = prompt.input_ids_S.cpu()
        tokens_BT[b, S : S + R] = r.response_ids_R.cpu()
        position_ids_3BT[:, b, :S] = prompt.position_ids_3S.cpu()
        position_ids_3BT[:, b, S : S + R] = prompt.response_position_ids_3R(R)
        if r.valid:
            loss_mask_BT[b, S : S + R] = 1.0
        if sampler_logp_BT is not None:
            if r.sampler_logp_R.numel() != R:
                raise ValueError(
                    f"rollout {r.sample_id}: {r.sampler_logp_R.numel()} sampler log-probs for "
                    f"{R} response tokens"
                )
            sampler_logp_BT[b, S : S + R] = r.sampler_logp_R.float().cpu()
    used = sorted({r.group_index for r in rollouts})
    remap = {old: new for new, old in enumerate(used)}
    return TrainBatch(
        tokens_BT=tokens_BT,
        position_ids_3BT=position_ids_3BT,
        loss_mask_BT=loss_mask_BT,
        adv_B=adv_B.detach().float().cpu(),
        prompt_index_B=torch.tensor([remap[r.group_index] for r in rollouts]),
        seq_len_B=torch.tensor(lengths),
        vision=[prompts[i].vision_kwargs for i in used],
        sampler_logp_BT=sampler_logp_BT,
    )
