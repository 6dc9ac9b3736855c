"""Streaming access to Hugging Face model directories: safetensors in, safetensors out, assets.

:class:`HFWeightReader` reads one tensor at a time from ``model.safetensors`` or a sharded
``model.safetensors.index.json`` set (files are memory-mapped; nothing else is loaded).
:class:`SafetensorsShardWriter` writes tensors as they come into shards of bounded size and the
index ``transformers`` expects. ``copy_hf_assets`` copies the config, tokenizer, processor and
chat-template files a run needs; ``save_processor_files`` writes the processor files
(``processor_config.json`` and the tokenizer) a folder lacks, so ``AutoProcessor`` loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.convert.mapping import normalize_hf_name

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything in a HF model directory except the weights.
ASSET_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
# Either one lets ``AutoProcessor`` build the image + video processors.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class HFWeightReader:
    """Tensor-at-a-time reader over a HF directory's safetensors files."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            with safe_open(self.dir / SINGLE_FILE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise ConfigError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (not a HF model dir?)")
        self._where = {normalize_hf_name(k): (file, k) for k, file in weight_map.items()}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.dir}: tensor '{name}' not found in the safetensors files")
        file, stored = self._where[name]
        # Opened per tensor: a file kept open keeps every page read so far mapped (and counted
        # in the process's memory) until the end of the conversion.
        with safe_open(self.dir / file, framework="pt") as f:
            return f.get_tensor(stored)


class SafetensorsShardWriter:
    """Accumulates tensors and writes a shard whenever ``max_shard_bytes`` would be exceeded.

    ``close()`` names the shards ``model-0000i-of-0000n.safetensors`` (or ``model.safetensors``
    when there is one) and writes the index. Peak memory is about one shard.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        tmp = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.dir / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / tmp).rename(self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_hf_assets(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config / tokenizer / processor / chat-template files; returns the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ASSET_PATTERNS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "config.json" not in copied:
        raise ConfigError(f"{src}: no config.json to copy")
    return copied


def has_processor_files(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return any((d / f).is_file() for f in PROCESSOR_FILES)


def save_processor_files(
    model_dir: str | Path,
    hf_config,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Path:
    """Write the Qwen-VL processor of ``model_dir`` (its tokenizer + image/video processors with
    the vision tower's patch, temporal patch and merge sizes) as ``processor_config.json``.

    Pixel limits default to the Qwen-VL processors' own. The tokenizer must already be there.
    """
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{model_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    vision = hf_config.vision_config
    kwargs = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    if min_pixels is not None and max_pixels is not None:
        kwargs["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cls = Qwen2VLProcessor if hf_config.model_type == "qwen2_vl" else Qwen2_5_VLProcessor
    processor = cls(
        image_processor=Qwen2VLImageProcessor(**kwargs),
        video_processor=Qwen2VLVideoProcessor(**kwargs),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(str(model_dir))
    return model_dir / "processor_config.json"
