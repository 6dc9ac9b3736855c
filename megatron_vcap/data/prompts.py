"""Prompt building: the Qwen chat template, structured-thinking instruction, video pad expansion.

The prompt is the model's own chat template (read from the tokenizer in the model directory, so
real Qwen2-VL / Qwen2.5-VL checkpoints work unchanged) rendered with one user turn holding the
video and the instruction, ending with the assistant turn start. The single ``<|video_pad|>`` the
template writes is expanded to ``prod(video_grid_thw) / merge_size**2`` copies in token-id space,
as the Qwen processors do in text space. Special-token ids are looked up by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_vcap.data.tokens import special_token_ids
from megatron_vcap.data.vision import VideoInputs

IGNORE_INDEX = -100

STRUCTURED_THINKING_INSTRUCTION = (
    "Describe this video in detail. First think step by step inside <think> </think>: for each "
    "main subject write a line 'Subject N: <short description>', then a line 'Attributes: "
    "<its visual attributes, separated by semicolons>', then a line 'Actions: <what it does, in "
    "order, separated by semicolons>'. Then write the final caption inside <answer> </answer>."
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's chat format: a default system turn, vision items as
# <|vision_start|><|video_pad|><|vision_end|>, every turn closed by <|im_end|> and a newline.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' or 'image' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


@dataclass
class PromptInputs:
    input_ids: torch.Tensor  # int64 [S]: the chat-templated prompt, pads expanded
    num_video_tokens: int
    video_token_id: int
    text: str  # the rendered template, one <|video_pad|> (for logs)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's own chat template; Qwen's format when it has none or it drops the video."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        wants_video = any(
            isinstance(m["content"], list) and any(i.get("type") == "video" for i in m["content"])
            for m in messages
        )
        if not wants_video or VIDEO_PLACEHOLDER in text:
            return text
    return tokenizer.apply_chat_template(
        messages,
        chat_template=QWEN_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def video_messages(instruction: str, system_prompt: str | None = None) -> list[dict]:
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}
    )
    return messages


def build_prompt(
    tokenizer,
    video: VideoInputs,
    *,
    instruction: str = STRUCTURED_THINKING_INSTRUCTION,
    system_prompt: str | None = None,
    merge_size: int = 2,
) -> PromptInputs:
    """Chat-templated prompt ids [S] ending with ``<|im_start|>assistant\\n``, video pads expanded."""
    ids = special_token_ids(tokenizer)
    pad_id = ids["<|video_pad|>"]
    text = render_chat(tokenizer, video_messages(instruction, system_prompt))
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    positions = [i for i, t in enumerate(token_ids) if t == pad_id]
    if len(positions) != 1:
        raise ValueError(f"the chat template produced {len(positions)} video placeholders, not 1")
    n = video.num_tokens(merge_size)
    p = positions[0]
    expanded = token_ids[:p] + [pad_id] * n + token_ids[p + 1 :]
    return PromptInputs(
        input_ids=torch.tensor(expanded, dtype=torch.long),
        num_video_tokens=n,
        video_token_id=pad_id,
        text=text,
    )


def append_target(
    tokenizer, prompt: PromptInputs, target_text: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [S], labels [S]): prompt + target + ``<|im_end|>``, labels -100 on the prompt."""
    im_end = special_token_ids(tokenizer)["<|im_end|>"]
    target = tokenizer(target_text, add_special_tokens=False)["input_ids"] + [im_end]
    target_t = torch.tensor(target, dtype=torch.long)
    input_ids = torch.cat([prompt.input_ids, target_t])
    labels = torch.cat([torch.full_like(prompt.input_ids, IGNORE_INDEX), target_t])
    return input_ids, labels


def build_sft_example(
    tokenizer,
    video: VideoInputs,
    target_text: str,
    *,
    instruction: str = STRUCTURED_THINKING_INSTRUCTION,
    system_prompt: str | None = None,
    merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [S], labels [S]) for SFT: the prompt, then ``target_text`` + ``<|im_end|>``;
    labels are -100 on the prompt so only the response and its closing token are learned."""
    prompt = build_prompt(
        tokenizer,
        video,
        instruction=instruction,
        system_prompt=system_prompt,
        merge_size=merge_size,
    )
    return append_target(tokenizer, prompt, target_text)
