"""Tiny Qwen-VL models for tests, the CPU demo and benchmarks: configs, tokenizer, processor, dirs.

``tiny_hf_config`` gives a ``transformers`` config small enough for CPU tests but with every
architectural feature on (GQA, QKV bias, mRoPE, 2x2 merge, Qwen2.5-VL windows with a full-attention
block). ``build_tiny_processor`` builds a character-level tokenizer (``build_char_tokenizer``) with the Qwen special tokens
at the top of the vocabulary and the real HF image / video processors, without downloads.
``save_tiny_hf_model_dir`` writes a complete HF model directory (config, safetensors, tokenizer,
processor, chat template) that ``transformers`` and the ``vcap convert`` CLIs load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from megatron_vcap.data.prompts import QWEN_CHAT_TEMPLATE
from megatron_vcap.data.tokens import SPECIAL_TOKENS

# Printable ASCII, one token per character; the special tokens follow at the top of the vocab.
_CHARS = [chr(i) for i in range(32, 127)]
MIN_TINY_VOCAB = len(_CHARS) + len(SPECIAL_TOKENS)


def _top_of_vocab(vocab_size: int) -> dict[str, int]:
    """Where the character tokenizer puts the special tokens: the last ids, in list order."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS)}


def tiny_hf_config(arch: Literal["qwen2_vl", "qwen2_5_vl"], vocab_size: int = 128, **overrides):
    """A tiny random-model config. ``overrides`` set top-level, ``text_config`` or
    ``vision_config`` fields: keys prefixed ``text_`` / ``vision_`` go to the sub-config
    (``text_num_hidden_layers=4``, ``vision_depth=4``), others to the top level
    (``image_token_id=...``, ``tie_word_embeddings=True``)."""
    ids = _top_of_vocab(vocab_size)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rope_theta=10000.0,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    elif arch == "qwen2_5_vl":
        # 56 px windows = 2x2 merged units, so small test images span several windows.
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=4,
        )
    else:
        raise ValueError(f"arch: expected 'qwen2_vl' or 'qwen2_5_vl', got {arch!r}")
    top = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    for key, value in overrides.items():
        if key.startswith("text_"):
            text[key[len("text_") :]] = value
        elif key.startswith("vision_"):
            vision[key[len("vision_") :]] = value
        else:
            top[key] = value
    if arch == "qwen2_vl":
        vision["hidden_size"] = text["hidden_size"]
        from transformers import Qwen2VLConfig as Config
    else:
        vision["out_hidden_size"] = text["hidden_size"]
        from transformers import Qwen2_5_VLConfig as Config
    return Config(text_config=text, vision_config=vision, **top)


def build_char_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer with the Qwen special tokens at the top of the vocab
    (the ids ``tiny_hf_config`` gives them), for tiny test models of any vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_TINY_VOCAB:
        raise ValueError(f"vocab_size: the tiny tokenizer needs >= {MIN_TINY_VOCAB}")
    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update(_top_of_vocab(vocab_size))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def build_tiny_processor(hf_config, *, max_pixels: int = 28 * 28 * 16):
    """HF processor (tiny tokenizer + the real Qwen2-VL image / video processors)."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vision = hf_config.vision_config
    pixel_kwargs = dict(
        min_pixels=28 * 28,
        max_pixels=max_pixels,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    processor_cls = Qwen2VLProcessor if hf_config.model_type == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixel_kwargs),
        tokenizer=build_char_tokenizer(hf_config.text_config.vocab_size),
        video_processor=Qwen2VLVideoProcessor(**pixel_kwargs),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def randomize_hf_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every weight (norms and biases included) random values, so that a mapping mistake
    in conversion or in the model shows up in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(std * noise)


def build_tiny_hf_model(hf_config, seed: int = 0):
    """The ``transformers`` model for a (tiny) config, with randomized weights, fp32, eager."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = (
        Qwen2VLForConditionalGeneration
        if hf_config.model_type == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(hf_config).eval()
    randomize_hf_weights(model, seed)
    return model


def save_tiny_hf_model_dir(
    out_dir: str | Path,
    arch: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_5_vl",
    *,
    vocab_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a random tiny model as a complete HF directory (weights, config, tokenizer, processor)."""
    out_dir = Path(out_dir)
    config = tiny_hf_config(arch, vocab_size, **overrides)
    model = build_tiny_hf_model(config, seed).to(dtype)
    model.save_pretrained(out_dir)
    build_tiny_processor(config).save_pretrained(out_dir)
    return out_dir


def synthetic_frames(num_frames: int, height: int, width: int, seed: int = 0):
    """Random RGB frames [num_frames, height, width, 3] uint8 (an image when num_frames == 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.random((num_frames, height, width, 3)) * 255).astype(np.uint8)


def build_tiny_inputs(
    processor,
    texts: list[str],
    *,
    images: list | None = None,
    videos: list | None = None,
    video_fps: list[float] | None = None,
    padding_side: str = "left",
):
    """Run the HF processor on a batch; videos are already-sampled frames at ``video_fps``.

    ``texts`` hold one ``<|vision_start|><|image_pad|><|vision_end|>`` (or ``video_pad``) per
    image / video, in order. The frame rate goes in as ``video_metadata`` with frame sampling
    off, so that ``second_per_grid_ts`` is 2 / fps (given as ``fps=`` it would be ignored).
    """
    processor.tokenizer.padding_side = padding_side
    kwargs = {}
    if videos:
        fps = video_fps or [2.0] * len(videos)
        kwargs["videos_kwargs"] = dict(
            video_metadata=[
                {"fps": float(f), "total_num_frames": len(v)} for f, v in zip(fps, videos)
            ],
            do_sample_frames=False,
        )
    return processor(
        text=texts,
        images=images or None,
        videos=videos or None,
        padding=True,
        return_tensors="pt",
        **kwargs,
    )
