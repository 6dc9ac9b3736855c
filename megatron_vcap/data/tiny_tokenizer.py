"""A tiny Qwen-style tokenizer for the synthetic demo, trained offline with ``tokenizers``.

Byte-level BPE (like Qwen's, so any text is encodable) with a few hundred tokens, trained on the
caller's corpus (``data/synth.py`` passes its scenes' structured responses and events) plus the
instruction and the chat scaffolding, so the demo's prompts and targets tokenize compactly for a tiny model. It
carries Qwen's special tokens and a Qwen chat template and is saved in the Hugging Face layout
(``tokenizer.json`` + ``tokenizer_config.json``), loadable with ``AutoTokenizer.from_pretrained``.
The special tokens are ``data/tokens.py``'s list. A corpus that depends only on a fixed seed gives the same tokenizer every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from megatron_vcap.data.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    QWEN_CHAT_TEMPLATE,
    STRUCTURED_THINKING_INSTRUCTION,
)
from megatron_vcap.data.tokens import SPECIAL_TOKENS

# The chat scaffolding every prompt and target carries, added to the caller's corpus.
_SCAFFOLDING = (
    STRUCTURED_THINKING_INSTRUCTION,
    DEFAULT_SYSTEM_PROMPT,
    "system\n",
    "user\n",
    "assistant\n",
)


def build_tiny_tokenizer(
    out_dir: str | os.PathLike, corpus: Iterable[str], vocab_size: int = 640
) -> Path:
    """Train a tokenizer on ``corpus`` (plus the chat scaffolding), save it into ``out_dir``;
    returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_SCAFFOLDING, *corpus], trainer)
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
