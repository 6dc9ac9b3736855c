"""Glue between data items, the model and the reward service; the frozen reference policy.

* :class:`PromptBuilder` turns a loader item (sample + processed video + prompt ids) into the
  ``PromptSpec`` generation needs (mRoPE ids from the model's rope index, vision inputs), knows the
  tokenizer's stop tokens, and builds reward requests from generated samples.
* :class:`ReferencePolicy` holds the frozen initial weights; with ``offload`` it keeps them on the
  CPU between reference passes (GPU memory is then free for the policy).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_vcap.data.tokens import STOP_TOKENS, VISION_TOKENS
from megatron_vcap.rollout.types import PromptSpec


class PromptBuilder:
    def __init__(self, tokenizer, hf_config):
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        ids = []
        for tok in STOP_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                ids.append(tid)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        if not ids:
            raise ValueError("tokenizer: none of <|im_end|>, <|endoftext|> or an EOS token exist")
        self.eos_token_ids = ids
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else ids[-1]
        # Vision placeholders are only ever inserted by the prompt builder, never generated.
        self.suppress_token_ids = [
            t
            for t in (tokenizer.convert_tokens_to_ids(v) for v in VISION_TOKENS)
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id
        ]

    def sampling_params(self, rollout_cfg, **overrides):
        from megatron_vcap.rollout.sampling import SamplingParams

        return SamplingParams.from_config(
            rollout_cfg,
            self.eos_token_ids,
            suppress_token_ids=self.suppress_token_ids,
            **overrides,
        )

    def prompt_spec(self, item) -> PromptSpec:
        from megatron_vcap.models.mrope import compute_mrope_position_ids

        input_ids_S = torch.as_tensor(item.prompt.input_ids, dtype=torch.long)
        video = item.video
        position_ids, deltas = compute_mrope_position_ids(
            input_ids_S[None],
            video_grid_thw=video.video_grid_thw,
            second_per_grid_ts=torch.tensor([video.second_per_grid_ts], dtype=torch.float32),
            hf_config=self.hf_config,
        )
        vision = {
            "pixel_values_videos": video.pixel_values_videos,
            "video_grid_thw": video.video_grid_thw,
        }
        return PromptSpec(input_ids_S, position_ids[:, 0], int(deltas.reshape(-1)[0]), vision)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def reward_requests(self, items, outputs, texts):
        from megatron_vcap.rewards.service import RewardRequest

        requests = []
        for out, text in zip(outputs, texts):
            sample = items[out.prompt_index].sample
            requests.append(
                RewardRequest(
                    sample_id=f"{sample.id}/{out.sample_index}",
                    response=text,
                    caption=sample.caption,
                    subjects=sample.subjects,
                    events=sample.events,
                )
            )
        return requests


def sequence_multiple(model_cfg) -> int:
    """Row length multiple for training batches: Transformer Engine's FP8 GEMMs need the token
    count (rows x length) divisible by 16, so FP8 runs pad every row to a multiple of 16."""
    return 16 if model_cfg.fp8 is not None else 1


def decode_responses(tokenizer, outputs) -> list[str]:
    """Response texts without chat special tokens (what the reward parser reads)."""
    return [tokenizer.decode(o.response_ids_R.tolist(), skip_special_tokens=True) for o in outputs]


class ReferencePolicy:
    """Frozen copy of the initial policy weights used for the KL penalty."""

    def __init__(self, model: torch.nn.Module, *, offload: bool):
        """``model``: a separately built instance already holding the initial weights."""
        self.model = model
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.offload = offload and torch.cuda.is_available()
        self._device = next(self.model.parameters()).device
        if self.offload:
            self.model.to("cpu")

    @contextlib.contextmanager
    def on_device(self):
        if self.offload:
            self.model.to(self._device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")
                torch.cuda.empty_cache()
