"""Hugging Face directory -> Megatron dist checkpoint (+ the HF assets in ``<ckpt>/hf/``).

Each of the TP x PP ranks builds only its own part of the model (no random initialisation), reads
the HF tensors its parameters need one at a time (memory-mapped safetensors) and cuts its shard;
then all ranks write the checkpoint together. Peak memory per rank is its model shard plus one
full tensor; raising ``--tp`` / ``--pp`` spreads the model over more processes. The checkpoint
stores global tensors, so it loads later at any TP / PP.

Under ``torchrun`` / ``srun`` with several ranks the launched ranks are used (their number must be
a multiple of TP x PP); otherwise TP x PP local CPU ranks are spawned (gloo).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.models.hf_config import (
    check_parallel_layout,
    describe_hf_config,
    load_hf_config,
)
from megatron_vcap.parallel.launch_env import read_launch_env

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def params_dtype_of(hf_config) -> str:
    """The HF checkpoint's dtype as a ModelConfig.params_dtype name (weights are not cast)."""
    dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in _DTYPES:
        raise ConfigError(f"config: 'dtype' {dtype} is not supported (float32, bfloat16, float16)")
    return _DTYPES[dtype]


def convert_on_this_rank(hf_dir: str, out_dir: str, tp: int, pp: int, progress: bool = True):
    """The per-rank work (collective): build this rank's shard, fill it, save."""
    from megatron_vcap.convert.checkpoint import load_hf_weights, save_model_checkpoint
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.runtime import init_distributed

    ctx = init_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0
    )
    hf_config = load_hf_config(hf_dir)
    # Local layers on every machine: the checkpoint keys are the same as under TE.
    model_cfg = ModelConfig(params_dtype=params_dtype_of(hf_config), transformer_impl="local")
    model = build_qwen_vl_model(hf_config, model_cfg, init_weights=False)
    load_hf_weights(model, hf_dir, progress=progress and ctx.rank == 0)
    save_model_checkpoint(out_dir, model, hf_dir)
    return ctx.rank


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Convert, spawning TP x PP local ranks unless launched by torchrun / srun already."""
    hf_dir, out_dir = str(Path(hf_dir).resolve()), str(Path(out_dir).resolve())
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp / --pp: must be >= 1, got {tp} / {pp}")
    # Fail fast, before any process starts, on a bad config or a layout it cannot take.
    check_parallel_layout(describe_hf_config(load_hf_config(hf_dir)), tp, pp)
    if read_launch_env().world_size > 1:  # torchrun / srun started the ranks
        convert_on_this_rank(hf_dir, out_dir, tp, pp)
    else:
        from megatron_vcap.parallel.multiprocess import run_on_ranks

        run_on_ranks(convert_on_this_rank, tp * pp, hf_dir, out_dir, tp, pp, timeout=24 * 3600)
    return Path(out_dir)
