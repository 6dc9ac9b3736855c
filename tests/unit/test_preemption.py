"""StopGuard (real signals to this process and to a child), the wall-clock budget, config
validation of the stop settings, and judge.base_url_file against a real loopback HTTP server."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.trainer.config import TrainConfig
from megatron_vcap.trainer.judge_wait import wait_for_judge
from megatron_vcap.trainer.preemption import (
    REASON_NONE,
    REASON_SIGNAL,
    REASON_WALL,
    StopGuard,
    parse_signals,
)


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_parse_signals_and_config_errors():
    assert parse_signals(["SIGTERM", "usr1"]) == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ValueError, match="'SIGKILL' is not a signal that can be caught"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ConfigError, match="stop_signals: 'SIGNOPE'"):
        TrainConfig(stop_signals=["SIGNOPE"]).validate()
    with pytest.raises(ConfigError, match="max_wall_minutes: must be >= 0"):
        TrainConfig(max_wall_minutes=-1).validate()


def _sleeper():
    time.sleep(30)


def test_signals_set_the_flag_and_children_survive_them():
    before = signal.getsignal(signal.SIGTERM)
    guard = StopGuard(["SIGTERM", "SIGUSR1"]).install()
    try:
        assert guard.should_stop() == REASON_NONE
        # A child started under the guard inherits the blocked signals: Slurm's SIGTERM to
        # every process of a step must not kill data workers or checkpoint writers.
        child = mp.get_context("spawn").Process(target=_sleeper, daemon=True)
        child.start()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_for(lambda: guard.received), "SIGUSR1 was not recorded"
        assert guard.should_stop() == REASON_SIGNAL
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: recorded, nothing else
        assert _wait_for(lambda: len(guard.received) == 2)
        assert [name for name, _ in guard.received] == ["SIGUSR1", "SIGTERM"]
        os.kill(child.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert child.is_alive(), "a child of the guarded process died from SIGTERM"
        child.kill()
        child.join()
    finally:
        guard.close()
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_wall_clock_budget_counts_the_longest_step():
    now = [100.0]
    guard = StopGuard([], max_wall_minutes=1.0, clock=lambda: now[0])
    now[0] = 130.0
    guard.step_done(20.0)  # 30 s elapsed + a 20 s step ends at 50 s < 60 s
    assert guard.local_reason() == REASON_NONE
    now[0] = 141.0  # 41 + 20 = 61 s: the next step would end past the budget
    assert guard.local_reason() == REASON_WALL
    assert StopGuard([], max_wall_minutes=0.0, clock=lambda: 1e9).local_reason() == REASON_NONE


def test_judge_base_url_file_waits_for_file_and_server(tmp_path):
    from megatron_vcap.testing.fake_openai import FakeOpenAIServer

    url_file = tmp_path / "judge_url"
    cfg = JudgeConfig(kind="openai", base_url_file=str(url_file), wait_s=60)
    with FakeOpenAIServer() as server:
        writer = threading.Timer(0.5, url_file.write_text, (server.base_url + "\n",))
        writer.start()
        assert wait_for_judge(cfg, poll_s=0.1) == server.base_url
        writer.join()
    assert cfg.base_url == server.base_url

    # Nothing answers at the URL: the error names the file and what is wrong.
    url_file.write_text("http://127.0.0.1:9/v1\n")
    cfg = JudgeConfig(kind="openai", base_url_file=str(url_file), wait_s=0.3)
    with pytest.raises(ConfigError, match=r"judge_url: no judge after 0 s .*does not answer"):
        wait_for_judge(cfg, poll_s=0.1)
    url_file.write_text("judge-host:8000\n")
    with pytest.raises(ConfigError, match="expected an http"):
        wait_for_judge(cfg, poll_s=0.1)
    # The embedded judge or no file: nothing to wait for.
    assert wait_for_judge(JudgeConfig(base_url_file=str(url_file))) is None
