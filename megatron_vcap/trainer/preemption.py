"""Preemption-safe training: a stop signal or the wall-clock budget becomes one agreed stop.

Clusters warn a job before taking it away: Slurm sends SIGTERM on preemption, ``scancel`` or
``scontrol requeue`` (then SIGKILL after its ``KillWait``), and our sbatch scripts ask for
``--signal=B:USR1@180`` and forward that SIGUSR1 to every task 180 s before the time limit.
:class:`StopGuard` turns any of ``train.stop_signals`` into a flag; at every step boundary all
ranks all-reduce (MAX) that flag, so every rank decides at the same step to save one checkpoint
and leave with :data:`EXIT_PREEMPTED`. ``train.max_wall_minutes`` raises the same flag when the
next step would not finish inside the budget (measured from the trainer's start, judged by the
longest step so far).

Why the signals are blocked in the main thread and read by a watcher thread (``sigtimedwait``):
the signal mask is inherited by every child process, so data-loader workers and the checkpoint
writer's helper processes (Megatron's ``dist_checkpointing`` spawns a multiprocessing manager
and forks writers) do not die from the SIGTERM that Slurm sends to every process of the step,
and the save in progress completes. A Python handler stays installed as well, for a signal that
reaches a thread created before the guard. A second signal (during the save, or Slurm's
repeated SIGTERM) only sets the flag again; the atomic save keeps the previous checkpoint in any
case.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h ("try again later"): the trainer saved a checkpoint and stopped
# early on a stop signal or train.max_wall_minutes. The sbatch scripts requeue the job on it.
EXIT_PREEMPTED = 75

REASON_NONE, REASON_SIGNAL, REASON_WALL = 0, 1, 2
REASON_NAMES = {REASON_SIGNAL: "stop signal", REASON_WALL: "train.max_wall_minutes"}


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` -> signal numbers; a ValueError names the bad entry."""
    out = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        sig = getattr(signal.Signals, key, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"train.stop_signals: {name!r} is not a signal that can be caught")
        out.append(sig)
    return out


class StopGuard:
    """Records stop signals and the wall-clock budget; ``should_stop`` is a collective."""

    def __init__(
        self,
        signals: list[str],
        max_wall_minutes: float = 0.0,
        *,
        device: torch.device | None = None,
        clock=time.monotonic,
    ):
        self.signals = parse_signals(signals)
        self.budget_s = max_wall_minutes * 60.0
        self.device = device or torch.device("cpu")
        self.clock = clock
        self.start = clock()
        self.longest_step_s = 0.0
        self.received: list[tuple[str, float]] = []  # (signal name, seconds since start)
        self._previous: dict = {}
        self._blocked = False
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()

    # -- signal side ---------------------------------------------------------------------------
    def install(self) -> StopGuard:
        if not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("stop signals not handled: the trainer does not run in the main thread")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        # multiprocessing unblocks SIGINT/SIGTERM in the calling thread after it launches its
        # resource tracker (which ignores both itself): launch it now, before blocking.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self._blocked = True
        self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._closing.is_set():
            info = signal.sigtimedwait(self.signals, 0.2)
            if info is not None:
                self._record(info.si_signo)

    def _on_signal(self, signum, frame) -> None:
        self._record(signum)

    def _record(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.received.append((name, self.clock() - self.start))
        if len(self.received) == 1:
            log.warning("%s received: saving a checkpoint at the next step boundary", name)
        else:
            log.warning("%s received again: already stopping at the next step boundary", name)

    def summary(self) -> str:
        if not self.received:
            return f"{self.clock() - self.start:.1f} s after the start"
        name, at = self.received[0]
        return f"{self.clock() - self.start - at:.1f} s after {name}"

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
            self._blocked = False
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    # -- step side -----------------------------------------------------------------------------
    def step_done(self, seconds: float) -> None:
        self.longest_step_s = max(self.longest_step_s, seconds)

    def local_reason(self) -> int:
        if self.received:
            return REASON_SIGNAL
        if self.budget_s > 0 and self.clock() - self.start + self.longest_step_s >= self.budget_s:
            return REASON_WALL
        return REASON_NONE

    def should_stop(self) -> int:
        """The stop reason every rank agrees on (0: go on). Call on every rank, every step."""
        if self._blocked:  # re-assert: a library may have unblocked them in this thread
            signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        reason = self.local_reason()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([reason], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = int(flag.item())
        return reason


_ACTIVE: StopGuard | None = None


def build_stop_guard(train_cfg, device: torch.device | None = None) -> StopGuard:
    """A guard for this run, installed; one left open by a run that failed is closed first."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close()
    _ACTIVE = StopGuard(train_cfg.stop_signals, train_cfg.max_wall_minutes, device=device)
    return _ACTIVE.install()
