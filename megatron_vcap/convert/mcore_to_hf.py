"""Megatron dist checkpoint -> Hugging Face directory, one layer at a time.

Reads the model part of a checkpoint written by ``save_model_checkpoint`` (or by the trainer,
which uses the same layout), at whatever TP/PP it was saved: the checkpoint stores global tensors,
so a single process asks for one layer's tensors at a time (the language model's layers are
stacked along a leading axis, and one chunk of it is read) and passes them through the mapping
table into safetensors shards. Peak memory is about one output shard plus one layer. The config,
tokenizer and processor files come from ``<ckpt>/hf/``; where those hold no processor files,
default Qwen-VL ones are written (with a warning), so every export loads with ``AutoProcessor``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.convert import mapping
from megatron_vcap.convert.checkpoint import HF_ASSETS_SUBDIR
from megatron_vcap.convert.hf_io import (
    SafetensorsShardWriter,
    copy_hf_assets,
    has_processor_files,
    save_processor_files,
)
from megatron_vcap.models.hf_config import describe_hf_config, load_hf_config

log = logging.getLogger(__name__)

_LM_LAYER = re.compile(re.escape(mapping.LM_LAYER_PREFIX) + r"(\d+)\.(.+)")
_VISION_BLOCK = re.compile(r"vision\.blocks\.(\d+)\.")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _group_of(rule: mapping.Rule) -> str:
    """Rules read together: one LM layer, one vision block, or a tensor on its own."""
    match = _LM_LAYER.match(rule.mcore) or _VISION_BLOCK.match(rule.mcore)
    if match:
        return f"{'lm' if rule.mcore.startswith('language') else 'vision'}.{match.group(1)}"
    return rule.mcore


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """A DCP load planner that reads each requested buffer from a given global offset.

    Megatron's own loader cannot ask for one layer of a stacked tensor in a single process (it
    assigns the other layers' shards to "another rank"), so layer chunks are read through
    torch.distributed.checkpoint directly: Megatron's ``torch_dist`` format is a DCP checkpoint
    keyed by the ShardedTensor keys.
    """

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, buffer in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=buffer.shape)
            md = self.metadata.state_dict_metadata[fqn]
            requests += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(requests)

    def lookup_tensor(self, index) -> torch.Tensor:
        # The buffer holds exactly the requested chunk; read items address it from offset 0.
        return self.state_dict[index.fqn]


def _request(rule: mapping.Rule, metadata, num_layers: int):
    """(checkpoint key, empty buffer, global offset) for the whole of ``rule``'s tensor."""
    match = _LM_LAYER.match(rule.mcore)
    key = f"{mapping.LM_LAYER_PREFIX}{match.group(2)}" if match else rule.mcore
    if key not in metadata:
        raise ConfigError(f"checkpoint: no tensor '{key}' (needed for {rule.hf[0]})")
    meta = metadata[key]
    shape, dtype = tuple(meta.size), meta.properties.dtype
    if not match:
        return key, torch.empty(shape, dtype=dtype), (0,) * len(shape)
    if shape[0] != num_layers:
        raise ConfigError(
            f"checkpoint: '{key}' stacks {shape[0]} layers, the config says "
            f"{num_layers} (text_config.num_hidden_layers)"
        )
    offset = (int(match.group(1)),) + (0,) * (len(shape) - 1)
    return key, torch.empty((1, *shape[1:]), dtype=dtype), offset


def _read_group(ckpt_dir: Path, rules, metadata, num_layers: int) -> dict[str, torch.Tensor]:
    """Read the full tensors of ``rules`` -> {rule.mcore: tensor}."""
    requests = {r.mcore: _request(r, metadata, num_layers) for r in rules}
    buffers = {key: buf for key, buf, _ in requests.values()}
    offsets = {key: off for key, _, off in requests.values()}
    dcp.load(
        buffers,
        storage_reader=dcp.FileSystemReader(str(ckpt_dir)),
        planner=_ChunkLoadPlanner(offsets),
        no_dist=True,
    )
    out = {}
    for name, (key, _, _) in requests.items():
        tensor = buffers[key]
        out[name] = tensor[0] if _LM_LAYER.match(name) else tensor
    return out


def _check_backend(ckpt_dir: Path) -> None:
    meta = ckpt_dir / "metadata.json"
    if not meta.is_file():
        raise ConfigError(f"{ckpt_dir}: not a Megatron distributed checkpoint (no metadata.json)")
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ConfigError(
            f"{meta}: sharded_backend '{backend}' is not supported (expected 'torch_dist')"
        )


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
) -> Path:
    """Write ``out_dir`` with safetensors shards + config/tokenizer/processor files."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    _check_backend(ckpt_dir)
    hf_config = load_hf_config(ckpt_dir / HF_ASSETS_SUBDIR)
    spec = describe_hf_config(hf_config)
    metadata = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    rules = mapping.build_rules(spec)
    if spec.tie_word_embeddings:  # the embedding is written once, under its HF name
        rules = [r for r in rules if r.mcore != "language_model.output_layer.weight"]
    groups: dict[str, list[mapping.Rule]] = defaultdict(list)
    for rule in rules:
        groups[_group_of(rule)].append(rule)

    writer = SafetensorsShardWriter(out_dir, max_shard_bytes)
    dtypes = set()
    items = groups.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="mcore -> HF", unit="part")
    for _, group in items:
        loaded = _read_group(ckpt_dir, group, metadata, spec.num_layers)
        for rule in group:
            for name, tensor in zip(rule.hf, mapping.mcore_to_hf(rule, loaded[rule.mcore], spec)):
                writer.add(name, tensor)
                dtypes.add(tensor.dtype)
    writer.close()
    copy_hf_assets(ckpt_dir / HF_ASSETS_SUBDIR, out_dir)
    if not has_processor_files(out_dir):
        log.warning(
            "%s has no processor files; writing default Qwen-VL ones to %s (check the pixel "
            "limits in processor_config.json against the ones the model was trained with)",
            ckpt_dir / HF_ASSETS_SUBDIR,
            out_dir,
        )
        save_processor_files(out_dir, hf_config)
    _sync_config_dtype(out_dir / "config.json", dtypes)
    return out_dir


def _sync_config_dtype(config_file: Path, dtypes: set) -> None:
    """Make config.json's dtype name the dtype the weights were written in (when it differs)."""
    if len(dtypes) != 1:
        return
    name = _DTYPE_NAMES.get(next(iter(dtypes)))
    config = json.loads(config_file.read_text())
    if name is None or config.get("dtype", config.get("torch_dtype")) == name:
        return
    config["dtype"] = name
    config.pop("torch_dtype", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
