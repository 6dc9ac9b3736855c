"""Model checkpoints: HF weights into a built model, and Megatron dist-checkpoint save / load.

Checkpoint convention (shared with the trainer): a checkpoint directory is a Megatron
``dist_checkpointing`` directory saved from ``{"model": model.sharded_state_dict(), ...}`` (other
top-level keys, e.g. "optimizer", may sit beside "model"), with the HF assets (config.json,
tokenizer, processor, chat template) copied into ``<ckpt>/hf/``. Tensors are stored with global
shapes, so a checkpoint written at one TP/PP layout loads at any other.

Saves are atomic: everything is written into ``<ckpt>.tmp`` and renamed once complete. Every
entry script that saves must keep its work under ``if __name__ == "__main__":``: the
dist-checkpoint writer starts a helper process with the spawn method.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.convert import mapping
from megatron_vcap.convert.hf_io import HFWeightReader, copy_hf_assets

HF_ASSETS_SUBDIR = "hf"


def unwrap_model(model):
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "spec"):
        model = model.module
    return model


def _lm_layer_offset(model) -> int:
    layers = model.language_model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _tp_rank_size(model) -> tuple[int, int]:
    """This rank's TP position from the ParallelContext (single process: rank 0 of 1)."""
    from megatron_vcap.parallel.runtime import current_context

    ctx = current_context()
    if ctx is None:
        tp_size = getattr(getattr(model, "config", None), "tensor_model_parallel_size", 1)
        if tp_size != 1:
            raise RuntimeError(f"a TP={tp_size} model needs init_distributed before loading")
        return 0, 1
    return ctx.tp_rank, ctx.tp_size


def load_hf_weights(model, hf_dir: str | Path, *, progress: bool = False) -> int:
    """Stream HF safetensors into this rank's (TP/PP-sharded) model; returns tensors loaded.

    Reads only the tensors this rank's parameters need, one at a time. Raises ConfigError when
    the HF files lack a tensor the model needs or hold one the mapping does not know.
    """
    model = unwrap_model(model)
    spec = model.spec
    rules = {rule.mcore: rule for rule in mapping.build_rules(spec)}
    reader = HFWeightReader(hf_dir)
    known = {name for rule in rules.values() for name in rule.hf}
    unknown = sorted(set(reader.names()) - known)
    if unknown:
        raise ConfigError(f"{hf_dir}: tensors the {spec.arch} mapping does not know: {unknown[:5]}")
    missing = sorted(known - set(reader.names()))
    if missing:
        raise ConfigError(f"{hf_dir}: missing tensors {missing[:5]} ({len(missing)} in all)")
    tp_rank, tp_size = _tp_rank_size(model)
    offset = _lm_layer_offset(model)
    params = list(model.named_parameters())
    if progress:
        from tqdm import tqdm

        params = tqdm(params, desc="loading HF weights", unit="tensor")
    with torch.no_grad():
        for name, param in params:
            canonical = mapping.canonical_mcore_name(name, offset)
            rule = rules.get(canonical)
            if rule is None:
                raise KeyError(f"model parameter '{name}' ({canonical}) has no mapping rule")
            full = mapping.hf_to_mcore(rule, [reader.get(n) for n in rule.hf], spec)
            param.copy_(mapping.shard_for_rank(rule, full, param.shape, tp_rank, tp_size))
    return len(params)


# ---- Megatron dist checkpoints --------------------------------------------------------------


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(
    ckpt_dir: str | Path,
    model,
    hf_assets_dir: str | Path,
    extra_sharded_state: dict | None = None,
    common_state: dict | None = None,
) -> Path:
    """Save ``{"model": ..., **extra_sharded_state, **common_state}`` atomically (collective).

    ``extra_sharded_state`` holds other sharded state (e.g. {"optimizer": opt.sharded_state_dict(
    ...)}); ``common_state`` plain picklable values (iteration, RNG, ...). HF assets from
    ``hf_assets_dir`` are copied into ``<ckpt>/hf/``.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    state = {"model": model.sharded_state_dict()}
    for extra in (extra_sharded_state or {}), (common_state or {}):
        clash = set(extra) & set(state)
        if clash:
            raise ValueError(f"checkpoint state: key(s) {sorted(clash)} given twice")
        state.update(extra)
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank0():
        copy_hf_assets(hf_assets_dir, tmp / HF_ASSETS_SUBDIR)
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        tmp.rename(ckpt_dir)
    _barrier()
    return ckpt_dir


def load_model_checkpoint(ckpt_dir: str | Path, model, extra_sharded_state: dict | None = None):
    """Load the model (and any ``extra_sharded_state`` parts) from a dist checkpoint (collective).

    Returns the loaded state dict: its "model" entry has been copied into ``model``; other
    requested parts and the checkpoint's common state are returned for the caller to apply.
    Other keys in the checkpoint (e.g. an optimizer not asked for) are left on disk.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = Path(ckpt_dir)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(ckpt_dir)):
        raise ConfigError(f"{ckpt_dir}: not a Megatron distributed checkpoint")
    state = {"model": model.sharded_state_dict(), **(extra_sharded_state or {})}
    loaded, _, absent = dist_checkpointing.load(
        state, str(ckpt_dir), strict=StrictHandling.RETURN_UNEXPECTED
    )
    # TE keeps FP8 metadata in "_extra_state" entries that a checkpoint written without TE
    # lacks; those stay at their defaults. Anything else missing is an error.
    absent = sorted(k for k in absent if not k.endswith("_extra_state"))
    if absent:
        raise ConfigError(f"{ckpt_dir}: checkpoint lacks {absent[:5]} ({len(absent)} in all)")
    result = unwrap_model(model).load_state_dict(loaded["model"], strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if bad or result.unexpected_keys:
        raise ConfigError(
            f"{ckpt_dir}: model state mismatch: missing {bad[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return loaded
