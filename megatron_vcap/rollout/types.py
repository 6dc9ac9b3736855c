"""Records passed into and out of rollout generation: one prompt in, one response per sample out.

A :class:`PromptSpec` carries everything the model needs to prefill one prompt: its token ids,
its 3-axis mRoPE position ids (text, or text with image/video placeholders as computed by the
model's ``get_rope_index``), the rope delta that continues those positions while decoding, and
the vision inputs that only the prefill call sees. Shape legend: S = prompt tokens, R = response
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class PromptSpec:
    """One prompt. ``position_ids_3S`` are (t, h, w) positions; decode positions continue as
    ``s + rope_delta`` on all three axes for the s-th token of the sequence (0-based)."""

    input_ids_S: torch.Tensor
    position_ids_3S: torch.Tensor
    rope_delta: int = 0
    # Model keyword arguments seen only at prefill (pixel_values_videos, video_grid_thw, ...).
    vision_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids_S.dim() != 1 or self.input_ids_S.numel() == 0:
            raise ValueError(
                f"input_ids_S: expected a non-empty 1-D tensor, got {tuple(self.input_ids_S.shape)}"
            )
        expected = (3, self.input_ids_S.numel())
        if tuple(self.position_ids_3S.shape) != expected:
            raise ValueError(
                f"position_ids_3S: expected shape {expected}, got "
                f"{tuple(self.position_ids_3S.shape)}"
            )

    @classmethod
    def from_text_ids(cls, input_ids_S: torch.Tensor | list[int]) -> PromptSpec:
        """A text-only prompt: positions 0..S-1 on all three axes, rope delta 0."""
        ids = torch.as_tensor(input_ids_S, dtype=torch.long)
        pos = torch.arange(ids.numel(), dtype=torch.long).unsqueeze(0).expand(3, -1).clone()
        return cls(ids, pos, 0)

    @property
    def length(self) -> int:
        return self.input_ids_S.numel()

    def response_position_ids_3R(self, num_response: int) -> torch.Tensor:
        """Position ids of the first ``num_response`` tokens after the prompt."""
        s = torch.arange(self.length, self.length + num_response, dtype=torch.long)
        return (s + self.rope_delta).unsqueeze(0).expand(3, -1).clone()


@dataclass
class GenerationOutput:
    """One sampled response. ``logprobs_R`` (when asked for) are the sampled tokens'
    log-probabilities under the model at the sampling temperature, before top-k/top-p."""

    prompt_index: int
    sample_index: int
    response_ids_R: torch.Tensor
    finish_reason: FinishReason
    logprobs_R: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.response_ids_R.numel()
