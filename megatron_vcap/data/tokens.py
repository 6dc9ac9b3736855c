"""Qwen-VL's special tokens: the one list, and their ids in a tokenizer, looked up by name.

Every tokenizer the project builds (the character-level one for tiny test models, the BPE one for
the synthetic demo) carries exactly these tokens, and every consumer (prompt building, stop and
suppressed tokens, tiny model configs) finds their ids by name through :func:`special_token_ids`,
so real Qwen2-VL / Qwen2.5-VL checkpoints and the tiny stand-ins take the same code path.
"""

from __future__ import annotations

# Qwen2-VL's special tokens, in its tokenizer's order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Tokens that end an assistant turn.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Vision placeholders: only ever inserted by the prompt builder, never generated.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of :data:`SPECIAL_TOKENS` in ``tokenizer``, by name; a missing one is a clear error."""
    ids = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is None or (unk is not None and token_id == unk):
            where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"tokenizer {where} has no special token {name} (not a Qwen-VL one)")
        ids[name] = int(token_id)
    return ids
