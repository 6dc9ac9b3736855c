"""LR schedule on resume: the config's ``train.steps`` and schedule win over the checkpoint's.

The expected LRs are written out from the schedule's definition (linear warmup, then
``min + (max - min) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of the decay steps done).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from megatron_vcap.trainer.config import TrainConfig
from megatron_vcap.trainer.optim import build_scheduler, restore_scheduler

LR, MIN_LR = 1e-3, 1e-4


def _cosine_lr(n: int, steps: int, warmup: int) -> float:
    """LR at scheduler count ``n`` (the update of step n + 1) by the formula."""
    if n <= warmup:
        return LR * n / warmup
    t = min((n - warmup) / (steps - warmup), 1.0)
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * t)) / 2


def _scheduler(steps: int, schedule: str = "cosine"):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    cfg = TrainConfig(steps=steps, lr=LR, min_lr=MIN_LR, lr_schedule=schedule, warmup_steps=1)
    return optimizer, build_scheduler(optimizer, cfg)


def _warnings(caplog) -> list:
    return [r for r in caplog.records if r.name.startswith("megatron_vcap") and r.levelno >= 30]


def _run(optimizer, scheduler, n: int) -> list[float]:
    used = []
    for _ in range(n):
        used.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return used


def test_extension_follows_the_config_cosine(caplog):
    opt, sched = _scheduler(4)
    first = _run(opt, sched, 2)
    assert first == pytest.approx([_cosine_lr(n, 4, 1) for n in (0, 1)])
    saved = sched.state_dict()

    opt8, sched8 = _scheduler(8)
    with caplog.at_level(logging.WARNING):
        restore_scheduler(sched8, saved)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "train.steps 4 -> 8" in warnings[0].getMessage()
    rest = _run(opt8, sched8, 6)
    assert rest == pytest.approx([_cosine_lr(n, 8, 1) for n in range(2, 8)], rel=1e-12)
    # The checkpoint's 4-step schedule would have reached min_lr by the 5th update.
    assert rest[2] > 2 * MIN_LR


def test_unchanged_schedule_resumes_silently(caplog):
    opt, sched = _scheduler(6)
    _run(opt, sched, 3)
    opt2, sched2 = _scheduler(6)
    with caplog.at_level(logging.WARNING):
        restore_scheduler(sched2, sched.state_dict())
    assert not _warnings(caplog)
    assert _run(opt2, sched2, 3) == _run(opt, sched, 3)


def test_changed_style_is_named(caplog):
    opt, sched = _scheduler(6, "constant")
    _run(opt, sched, 2)
    opt2, sched2 = _scheduler(6, "cosine")
    with caplog.at_level(logging.WARNING):
        restore_scheduler(sched2, sched.state_dict())
    (warning,) = _warnings(caplog)
    message = warning.getMessage()
    assert "train.lr_schedule 'constant' -> 'cosine'" in message and "train.min_lr" in message
    assert opt2.param_groups[0]["lr"] == pytest.approx(_cosine_lr(2, 6, 1))
