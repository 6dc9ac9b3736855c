"""A tiny Qwen-style tokenizer for the synthetic demo, trained offline with ``tokenizers``.

Byte-level BPE (like Qwen's, so any text is encodable) with a few hundred tokens, trained on text
from the synthetic-scene generator (captions, structured responses, events), the instruction and
the chat scaffolding, so the demo's prompts and targets tokenize compactly for a tiny model. It
carries Qwen's special tokens and a Qwen chat template and is saved in the Hugging Face layout
(``tokenizer.json`` + ``tokenizer_config.json``), loadable with ``AutoTokenizer.from_pretrained``.
The training corpus depends only on a fixed seed, so every synthetic dataset gets the same
tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_vcap.data.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    QWEN_CHAT_TEMPLATE,
    STRUCTURED_THINKING_INSTRUCTION,
)
from megatron_vcap.structure import render_response

# Qwen2-VL's special tokens (names only; ids are looked up by name everywhere).
QWEN_SPECIAL_TOKENS = [
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
]
CORPUS_SEED = 20250602
CORPUS_SCENES = 1500


def training_corpus(num_scenes: int = CORPUS_SCENES, seed: int = CORPUS_SEED) -> list[str]:
    """Texts the tokenizer is trained on: generator output plus prompt scaffolding."""
    from megatron_vcap.data.synth import describe_scene, random_scene

    rng = np.random.default_rng(seed)
    texts = [
        STRUCTURED_THINKING_INSTRUCTION,
        DEFAULT_SYSTEM_PROMPT,
        "system\n",
        "user\n",
        "assistant\n",
    ]
    for _ in range(num_scenes):
        scene = random_scene(rng, 160, 120, 4.0)
        caption, subjects, events = describe_scene(scene)
        texts.append(render_response(subjects, caption))
        texts.extend(events)
    return texts


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 640) -> Path:
    """Train and save the tokenizer into ``out_dir``; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    hf.chat_template = QWEN_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out
