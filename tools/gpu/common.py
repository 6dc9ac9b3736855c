"""What every section of the GPU kit shares: its context, results, timing and the process group.

A section is a function ``run(ctx: SectionContext) -> SectionResult`` in its own module; the
kit (:mod:`tools.gpu.kit`) runs each in a child process with a hard time limit and collects the
result JSON it writes. ``ctx.dry_run`` selects tiny shapes on CPU; ``ctx.time_left()`` lets a
benchmark drop its optional parts when the deadline approaches (it then says so in ``notes``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SectionContext:
    name: str
    dry_run: bool
    kit_dir: Path  # the carried folder: wheels/ and fixtures/
    work_dir: Path  # scratch space for this section (run dirs, checkpoints)
    deadline: float  # time.time() by which the section must have returned
    result_path: Path | None = None  # where the kit reads the result (also partial ones)

    @property
    def fixtures(self) -> Path:
        return self.kit_dir / "fixtures"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def save_partial(self, res: SectionResult) -> None:
        """Write the figures so far: kept if the kit kills the section at its limit."""
        if self.result_path is not None:
            self.result_path.write_text(json.dumps(res.to_dict(), default=str))


@dataclass
class SectionResult:
    """Figures (numbers), checks (pass/fail, each with the value and the bound it was held to)
    and targets (benchmark goals: reported, not failed on)."""

    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str = "", **values) -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail, **values})
        return bool(passed)

    def check_finite(self, name: str, value: float) -> bool:
        return self.check(name, value is not None and math.isfinite(value), value=value)

    def target(self, name: str, value: float, goal: str, met: bool) -> None:
        self.targets.append({"name": name, "value": value, "goal": goal, "met": bool(met)})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = bool(self.checks) and all(c["passed"] for c in self.checks)
        return out


def device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, repeats: int, warmup: int = 1, deadline: float | None = None):
    """Minimum wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and its last
    result; stops repeating (keeping at least one timed run) once ``deadline`` has passed."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        synchronize()
        t0 = time.perf_counter()
        out = fn()
        synchronize()
        times.append(time.perf_counter() - t0)
        if deadline is not None and time.time() > deadline:
            break
    return min(times), out


def init_single_rank(seed: int = 0):
    """A one-rank process group (NCCL on GPU, gloo on CPU) with Megatron's groups."""
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.parallel.runtime import init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    backend = "nccl" if device().type == "cuda" else "gloo"
    return init_distributed(ParallelConfig(backend=backend), seed=seed)


def measure_matmul_flops(n: int, repeats: int = 5) -> float:
    """bf16 (GPU) / fp32 (CPU) n x n x n matrix-product rate on this device, FLOP/s: the
    ceiling measured in the same process, beside the datasheet's."""
    import torch

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    seconds, _ = best_time(lambda: a @ b, repeats, warmup=2)
    return 2 * n**3 / seconds


def measure_copy_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """Device-to-device copy rate counting bytes read and written, bytes/s."""
    import torch

    dev = device()
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    seconds, _ = best_time(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * src.numel() / seconds


def peak_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc: torchrun starts each worker in a session of
    its own, so killing the child's process group alone would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """End a child that outran its limit, with its process group and every descendant
    (torchrun workers included): TERM first, so that torchrun agents stop their workers, then
    KILL whatever is left. Descendants are listed while the child still lives (orphans are
    re-parented and could no longer be found)."""
    targets = set(descendants(proc.pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            targets |= set(descendants(proc.pid))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    proc.wait()
