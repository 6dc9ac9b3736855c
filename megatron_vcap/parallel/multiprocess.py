"""Run a function on N gloo ranks on CPU and report every rank's failure with its traceback.

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, sets the torchrun-style
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on a free loopback port, calls
``fn(*args)`` in each, and returns the per-rank return values (which must be picklable). If any
rank raises, a ``MultiRankError`` lists each failing rank's traceback. A timeout kills stragglers.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


class MultiRankError(RuntimeError):
    pass


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, extra_env):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    os.environ.update(extra_env)
    try:
        result = fn(*args)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion errors
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron.core import parallel_state as ps

                ps.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, timeout: float = 600.0, env: dict | None = None):
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; returns results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env or {}))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, object]] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world_size and time.monotonic() < deadline:
        if not queue.empty():
            rank, ok, payload = queue.get()
            results[rank] = (ok, payload)
            continue
        if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
            time.sleep(0.5)
            if queue.empty():
                break
        time.sleep(0.05)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    failures = []
    for r in range(world_size):
        if r not in results:
            code = procs[r].exitcode
            failures.append(f"--- rank {r}: no result (exit code {code}; timed out or crashed)")
        elif not results[r][0]:
            failures.append(f"--- rank {r} raised:\n{results[r][1]}")
    if failures:
        raise MultiRankError(
            f"{len(failures)} of {world_size} ranks failed\n" + "\n".join(failures)
        )
    return [results[r][1] for r in range(world_size)]
