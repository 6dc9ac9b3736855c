"""Training sequences and micro-batches: prompt + response rows packed for the model.

A :class:`SequenceRow` is one trained sequence (a GRPO sample, or an SFT example): its tokens,
3-axis mRoPE position ids, a loss mask over *targets* (position t of the mask belongs to the
token at t + 1, which the logits at t predict), and the vision inputs its video needs. Rows are
right-padded into a :class:`MicroBatch`; right padding never changes the causal attention of the
real tokens, so no attention mask is needed.

Shape legend: L = tokens of one row, B = rows in a micro-batch, T = padded length - 1 (targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SequenceRow:
    tokens_L: torch.Tensor
    position_ids_3L: torch.Tensor
    # 1 where the target token (tokens_L[t + 1]) is trained on; length L - 1.
    target_mask_T: torch.Tensor
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    advantage: float = 0.0
    # Index of the rollout sample this row came from (GRPO), for gathering results back.
    index: int = 0


@dataclass
class MicroBatch:
    tokens_BL: torch.Tensor
    position_ids_3BL: torch.Tensor
    target_mask_BT: torch.Tensor
    adv_B: torch.Tensor
    indices: list[int]
    vision: dict[str, torch.Tensor]
    # Filled in after the reference pass (GRPO with KL); aligned with target_mask_BT.
    ref_logp_BT: torch.Tensor | None = None
    old_logp_BT: torch.Tensor | None = None

    @property
    def targets_BT(self) -> torch.Tensor:
        return self.tokens_BL[:, 1:]

    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.vision)


def build_row(
    prompt_ids_S: torch.Tensor,
    prompt_position_ids_3S: torch.Tensor,
    rope_delta: int,
    response_ids_R: torch.Tensor,
    *,
    vision: dict[str, torch.Tensor],
    advantage: float = 0.0,
    index: int = 0,
) -> SequenceRow:
    """Prompt + response as one row; only the response tokens are targets."""
    S, R = prompt_ids_S.numel(), response_ids_R.numel()
    tokens = torch.cat([prompt_ids_S.long(), response_ids_R.long().to(prompt_ids_S.device)])
    resp_pos = (torch.arange(S, S + R) + rope_delta).unsqueeze(0).expand(3, -1)
    positions = torch.cat([prompt_position_ids_3S.long(), resp_pos.to(prompt_position_ids_3S)], 1)
    mask = torch.zeros(S + R - 1, dtype=torch.float32)
    mask[S - 1 :] = 1.0
    return SequenceRow(tokens, positions, mask, vision, advantage, index)


def build_sft_row(
    input_ids_L: torch.Tensor,
    labels_L: torch.Tensor,
    position_ids_3L: torch.Tensor,
    *,
    vision: dict[str, torch.Tensor],
    index: int = 0,
) -> SequenceRow:
    """An SFT example: targets are the tokens whose label is not -100."""
    mask = (labels_L[1:] != -100).float()
    return SequenceRow(input_ids_L.long(), position_ids_3L.long(), mask, vision, 0.0, index)


def _cat_vision(rows: Sequence[SequenceRow]) -> dict[str, torch.Tensor]:
    """Vision inputs of all rows in row order: pixel patches concatenated, grids stacked."""
    keys = sorted({k for r in rows for k in r.vision})
    out = {}
    for key in keys:
        parts = [r.vision[key] for r in rows if key in r.vision]
        out[key] = torch.cat(parts, dim=0)
    return out


def collate_rows(rows: Sequence[SequenceRow], pad_id: int) -> MicroBatch:
    """Right-pad rows into one micro-batch (pad targets are masked out)."""
    if not rows:
        raise ValueError("collate_rows: no rows")
    L = max(r.tokens_L.numel() for r in rows)
    B = len(rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    positions = torch.zeros((3, B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.float32)
    for b, r in enumerate(rows):
        n = r.tokens_L.numel()
        tokens[b, :n] = r.tokens_L
        positions[:, b, :n] = r.position_ids_3L
        # Padding continues the positions so rotary tables never see a gap or a repeat.
        if n < L:
            positions[:, b, n:] = r.position_ids_3L[:, -1:] + torch.arange(1, L - n + 1)
        mask[b, : n - 1] = r.target_mask_T
    adv = torch.tensor([r.advantage for r in rows], dtype=torch.float32)
    return MicroBatch(tokens, positions, mask, adv, [r.index for r in rows], _cat_vision(rows))


def split_micro_batches(
    rows: Sequence[SequenceRow], micro_batch_size: int, pad_id: int
) -> list[MicroBatch]:
    """Consecutive slices of ``micro_batch_size`` rows (the last one may be smaller)."""
    return [
        collate_rows(rows[i : i + micro_batch_size], pad_id)
        for i in range(0, len(rows), micro_batch_size)
    ]
