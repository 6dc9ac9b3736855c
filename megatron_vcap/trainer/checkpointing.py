"""Training checkpoints: atomic Megatron dist-checkpoints, keep-last-K, exact resume.

Layout of ``<save_dir>/step_0000010/`` (the same convention as converted checkpoints, so
``vcap convert mcore-to-hf`` reads a training checkpoint directly):

* a Megatron ``dist_checkpointing`` directory saved from ``{"model": ..., "optimizer": ...,
  "trainer": {...}}``; the ``trainer`` entry (step, LR scheduler, sampling counters) is common
  state written once;
* ``rank_state/rank_00003.pt``: what differs per rank (RNG states, the data loader position);
* ``hf/``: the Hugging Face config, tokenizer and processor files the run started from;
* ``vcap_checkpoint.json``: step, layout and time, written last inside the directory.

Atomicity: everything is written to ``.tmp_step_*``, renamed into place by rank 0 once every rank
is done, and only then is ``latest`` replaced (write + ``os.replace``). A crash at any point leaves
the previous checkpoint and ``latest`` intact; stale temporary directories are removed later.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

META_FILE = "vcap_checkpoint.json"
LATEST_FILE = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _step_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"step_{step:07d}"


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam its per-parameter state (step, moments) before a load.

    Megatron's distributed optimizer reads ``state["step"]`` to build the state dict it loads
    into; on the plain-torch path (no TE/apex, e.g. CPU) a never-stepped optimizer has no state,
    and Megatron's own initialiser adds moments but no step. Zero state is what a fresh Adam
    would start from, and the load then overwrites all of it.
    """
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }


def _torch_adams(optimizer):
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield inner


def _adam_step(optimizer) -> float | None:
    for inner in _torch_adams(optimizer):
        for state in inner.state.values():
            if "step" in state:
                return float(state["step"])
    return None


def _set_adam_step(optimizer, step: float) -> None:
    # Megatron's dp_reshardable load on the plain-torch path restores the moments but leaves
    # Adam's per-parameter step at its initial value, which changes the bias correction of the
    # next update; the step is saved separately and put back here.
    for inner in _torch_adams(optimizer):
        for state in inner.state.values():
            state["step"] = torch.tensor(float(step))


def _sharded_state(bundle, trainer_state: dict | None, is_loading: bool, sharding: str) -> dict:
    model_sd = bundle.model.sharded_state_dict()
    # "dp_reshardable": each rank writes its own optimizer shard in parallel (resume at the same
    # TP/PP); "fully_reshardable": canonical per-parameter state (resume at any layout).
    metadata = {"distrib_optim_sharding_type": sharding}
    state = {
        "model": model_sd,
        "optimizer": bundle.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=metadata
        ),
    }
    if trainer_state is not None:
        state["trainer"] = trainer_state
    return state


def find_latest(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``save_dir`` (None if there is none)."""
    save_dir = Path(save_dir)
    latest = save_dir / LATEST_FILE
    if latest.is_file():
        candidate = save_dir / latest.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
        log.warning("%s points at %s, which is incomplete; scanning", latest, candidate)
    done = sorted(p for p in save_dir.glob("step_*") if (p / META_FILE).is_file())
    return done[-1] if done else None


class CheckpointManager:
    """Saves and restores full training state; owns the ``save_dir`` layout."""

    def __init__(
        self,
        save_dir: str | Path,
        *,
        keep_last: int,
        hf_assets_dir: str | Path | None,
        optimizer_sharding: str = "dp_reshardable",
    ):
        self.save_dir = Path(save_dir)
        self.optimizer_sharding = optimizer_sharding
        self.keep_last = keep_last
        self.hf_assets_dir = Path(hf_assets_dir) if hf_assets_dir else None

    def save(self, step: int, bundle, *, trainer_state: dict, rank_state: dict) -> Path:
        from megatron.core import dist_checkpointing

        rank = dist.get_rank() if dist.is_initialized() else 0
        final = _step_dir(self.save_dir, step)
        tmp = self.save_dir / f".tmp_{final.name}"
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            (tmp / "rank_state").mkdir()
        _barrier()
        trainer_state = {**trainer_state, "step": step, "adam_step": _adam_step(bundle.optimizer)}
        state = _sharded_state(bundle, trainer_state, False, self.optimizer_sharding)
        dist_checkpointing.save(state, str(tmp))
        torch.save(
            {**rank_state, "rng": capture_rng_state()}, tmp / "rank_state" / f"rank_{rank:05d}.pt"
        )
        _barrier()
        if rank == 0:
            if self.hf_assets_dir is not None:
                shutil.copytree(self.hf_assets_dir, tmp / "hf")
            world = dist.get_world_size() if dist.is_initialized() else 1
            meta = {"step": step, "world_size": world, "time": time.time()}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            if final.exists():  # a re-save of the same step replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
            pointer = self.save_dir / f".{LATEST_FILE}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.save_dir / LATEST_FILE)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.save_dir.glob("step_*") if (p / META_FILE).is_file())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.save_dir.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, ckpt_dir: str | Path, bundle) -> tuple[dict, dict]:
        """Restore model, optimizer, scheduler; returns (trainer_state, this rank's state)."""
        from megatron.core import dist_checkpointing

        from megatron_vcap.trainer.optim import restore_scheduler

        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / META_FILE).is_file():
            raise ValueError(f"{ckpt_dir}: not a complete training checkpoint (no {META_FILE})")
        meta = json.loads((ckpt_dir / META_FILE).read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        _materialize_adam_state(bundle.optimizer)
        state = _sharded_state(bundle, None, True, self.optimizer_sharding)
        loaded = dist_checkpointing.load(state, str(ckpt_dir))
        # fp32 runs: the optimizer's main params are views of the model params (leaf tensors that
        # require grad), which in-place copies reject outside no_grad.
        with torch.no_grad():
            bundle.model.load_state_dict(loaded["model"])
            bundle.optimizer.load_state_dict(loaded["optimizer"])
        trainer = dist_checkpointing.load_common_state_dict(str(ckpt_dir))["trainer"]
        if trainer.get("adam_step") is not None:
            _set_adam_step(bundle.optimizer, trainer["adam_step"])
        restore_scheduler(bundle.scheduler, trainer["scheduler"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        rank_file = ckpt_dir / "rank_state" / f"rank_{rank:05d}.pt"
        if meta["world_size"] != world or not rank_file.is_file():
            log.warning(
                "%s was saved with %s ranks, resuming on %s: RNG and loader positions restart",
                ckpt_dir,
                meta["world_size"],
                world,
            )
            return trainer, {}
        rank_state = torch.load(rank_file, weights_only=False)
        restore_rng_state(rank_state.pop("rng"))
        return trainer, rank_state
