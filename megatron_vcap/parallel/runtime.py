"""Distributed initialisation: process group, Megatron-Core model-parallel groups, seeding.

This module is the only place that calls ``parallel_state.initialize_model_parallel``; the rest of
the project receives a :class:`ParallelContext` and asks it for ranks and groups. Works under
``torchrun`` and ``srun`` (see ``launch_env``), with NCCL on GPU and gloo on CPU; on CPU the
compatibility layer (``cpu_compat``) is installed first so Megatron's TP/PP code paths run.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_vcap.parallel import cpu_compat
from megatron_vcap.parallel.config import ParallelConfig
from megatron_vcap.parallel.launch_env import LaunchEnv, read_launch_env


@dataclass
class ParallelContext:
    """Handles to this rank's position in the TP x CP x DP x PP grid and its groups."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    # Data parallel including context parallel: what gradients are reduced over.
    dp_cp_group: dist.ProcessGroup
    # DP group over gloo (object collectives, e.g. gathering metrics or loader state).
    dp_group_gloo: dist.ProcessGroup | None
    # TP x PP: the ranks that hold one model replica (they share prompts and rewards).
    mp_group: dist.ProcessGroup | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """Last pipeline stage, first TP/CP/DP rank: where losses and metrics are complete."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0


_CURRENT: ParallelContext | None = None


def resolve_backend(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def set_seed(seed: int, ctx: ParallelContext | None = None) -> None:
    """Seed Python, numpy, torch and Megatron's model-parallel RNG tracker.

    Data-parallel ranks get the same base seed (identical init of replicated weights); the
    tracker gives each TP rank its own stream for dropout inside tensor-parallel regions.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if ctx is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * ctx.pp_rank)


def init_distributed(cfg: ParallelConfig, seed: int = 1234, env: LaunchEnv | None = None):
    """Initialise torch.distributed and Megatron-Core's groups from the launcher's environment.

    Returns the :class:`ParallelContext`. Idempotent within a process if the layout matches.
    """
    from megatron.core import parallel_state as ps

    env = env or read_launch_env()
    dp_size = cfg.validate_world_size(env.world_size)
    backend = resolve_backend(cfg)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend: 'nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        cpu_compat.install()
        device = torch.device("cpu")

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size,
            distributed_timeout_minutes=cfg.timeout_minutes,
        )
    ctx = ParallelContext(
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        device=device,
        tp_size=cfg.tensor_model_parallel_size,
        pp_size=cfg.pipeline_model_parallel_size,
        cp_size=cfg.context_parallel_size,
        dp_size=dp_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        dp_group_gloo=ps.get_data_parallel_group_gloo(),
        mp_group=ps.get_model_parallel_group(),
    )
    set_seed(seed, ctx)
    global _CURRENT
    _CURRENT = ctx
    return ctx


def current_context() -> ParallelContext | None:
    """The context of this process's latest :func:`init_distributed` (None before it and after
    :func:`destroy_distributed`): for code that is handed a model but no context (weight loading).
    """
    return _CURRENT


def destroy_distributed(process_group: bool = True) -> None:
    """Tear down Megatron's groups and (unless ``process_group`` is False) the default group.

    Callers that found the process group already initialised (a test harness, a notebook)
    keep it alive for whatever runs next in the same processes.
    """
    from megatron.core import parallel_state as ps

    global _CURRENT
    _CURRENT = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
