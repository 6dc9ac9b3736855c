"""A judge server that goes away mid-run (issue 14, item 4), through a real loopback server.

The server is stopped and restarted at the same port while a batch is being judged. Refused
connections must wait for it (circuit breaker, bounded by ``judge.outage_timeout_s``) instead of
burning each request's retries; errors the server does send keep their retry count.
"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
from megatron_vcap.rewards.service import RewardRequest, RewardService
from megatron_vcap.structure import Subject, render_response
from megatron_vcap.testing.fake_openai import FakeOpenAIServer

GT = [Subject("a man", ["tall"], ["walks"])]


def requests(n: int) -> list[RewardRequest]:
    # Distinct captions: identical prompts would be sent once (deduplicated).
    return [
        RewardRequest(
            f"s{i}",
            render_response(GT, f"The man walks to door{i}."),
            f"The man walks to door{i}.",
            GT,
            [f"The man walks to door{i}."],
        )
        for i in range(n)
    ]


def judge_cfg(server: FakeOpenAIServer, **kw) -> JudgeConfig:
    base = dict(kind="openai", base_url=server.base_url, model="m", api_key_env="VCAP_NO_KEY")
    base.update(kw)
    return JudgeConfig(**base)


def run_with_outage(server, cfg: JudgeConfig, n: int, outage_s: float, after_requests: int):
    """Score n samples; stop the server once it has answered ``after_requests`` (0: before the
    first), restart it ``outage_s`` later. Returns (results, judge metrics, seconds down)."""
    down = {}

    def outage():
        while server.stats["requests"] < after_requests:
            time.sleep(0.005)
        if after_requests:
            server.stop()
            down["at"] = time.monotonic()
        time.sleep(outage_s)
        server.start()
        down["for"] = time.monotonic() - down["at"]

    with RewardService(RewardConfig(escore_mode="linear"), cfg) as svc:
        if not after_requests:  # down from the start
            server.stop()
            down["at"] = time.monotonic()
        handle = svc.submit(requests(n))
        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        results = handle.result(timeout=600)
        thread.join(timeout=outage_s + 30)
        metrics = svc.metrics()
    return results, metrics, down.get("for", 0.0)


def test_short_outage_mid_run_loses_nothing_and_does_not_hammer():
    """300 samples, server down for 3 s after 64 answers (concurrency 64).

    Retry budget shortened (0.01 s backoff doubling to 0.02 s, 4 retries: < 0.1 s of sleeps in
    all) so that a 3 s outage outlasts it, as the 20 s outage outlasts the defaults' 7.5-15 s
    (the slow test below runs the issue's case with the defaults).
    """
    with FakeOpenAIServer(latency_s=0.05) as server:
        cfg = judge_cfg(server, backoff_s=0.01, max_backoff_s=0.02, timeout_s=10)
        results, metrics, down_s = run_with_outage(server, cfg, 300, 3.0, after_requests=64)
    failed = [r for r in results if r.failed]
    print(f"{len(failed)} of 300 failed; server down {down_s:.1f} s; judge {metrics}")
    assert down_s >= 3.0
    assert [r.sample_id for r in results] == [f"s{i}" for i in range(300)]
    assert not failed, failed[0].failure_reason
    assert all(r.caption == 1.0 for r in results)  # each caption entails its one event
    # The breaker: while the server is down, requests wait instead of connecting. Refused
    # connections are those in flight when it went down (<= concurrency 64) plus about one
    # probe per interval (0.01 s doubling to 5 s: ~12 in 3 s) — not 200 samples x 5 attempts.
    refused = metrics.get("judge/errors/server_unreachable", 0)
    assert 1 <= refused <= 64 + 15, refused
    assert metrics["judge/requests"] == 300
    assert metrics["judge/attempts"] == (
        metrics["judge/requests"] + metrics.get("judge/retries", 0) + metrics["judge/reconnects"]
    )


def test_requests_wait_for_a_server_that_is_down_at_the_start():
    """8 samples, server down for the first 3 s. Their retries (4, 0.01-0.02 s apart) are spent
    in well under a second: before issue 14 all 8 failed with connection_error.

    (The mid-run test above does not show that reliably here: 64 refused connects at once take
    0.7-2 s on this machine, which spreads the old retries over the outage.)
    """
    with FakeOpenAIServer() as server:
        cfg = judge_cfg(server, concurrency=8, backoff_s=0.01, max_backoff_s=0.02)
        results, metrics, down_s = run_with_outage(server, cfg, 8, 3.0, after_requests=0)
    print(f"{sum(r.failed for r in results)} of 8 failed; down {down_s:.1f} s; {metrics}")
    assert not [r.failure_reason for r in results if r.failed]
    assert metrics["judge/outages"] == 1 and metrics.get("judge/retries", 0) == 0


def test_outage_timeout_fails_waiting_requests_then_recovers():
    with FakeOpenAIServer() as server:
        cfg = judge_cfg(server, backoff_s=0.05, outage_timeout_s=1.0, max_retries=4)
        server.stop()  # nothing listens at the port now
        start = time.monotonic()
        with RewardService(RewardConfig(escore_mode="linear"), cfg) as svc:
            results = svc.score(requests(20), timeout=60)
            waited = time.monotonic() - start
            assert all(r.failed for r in results)
            assert {r.failure_reason.split(":")[0] for r in results} == {"server_unreachable"}
            assert "outage_timeout_s" in results[0].failure_reason or "no connection" in (
                results[0].failure_reason
            )
            # Past the outage budget a request is sent once and fails at once ...
            again = svc.score(requests(2), timeout=60)
            assert all(r.failed for r in again)
            # ... until the server is back: then the judge works again.
            server.start()
            back = svc.score(requests(3), timeout=60)
            assert not any(r.failed for r in back)
    print(f"outage budget 1 s: waited {waited:.1f} s before failing")


def test_server_sent_errors_keep_their_retry_count():
    # HTTP 500s are the server's answer: a request fails after max_retries + 1 of them even
    # though the server is up (no waiting on the breaker for those).
    with FakeOpenAIServer(script=["http_500"] * 3) as server:
        cfg = judge_cfg(server, backoff_s=0.01, max_backoff_s=0.02, max_retries=2)
        with RewardService(RewardConfig(escore_mode="linear"), cfg) as svc:
            (result,) = svc.score(requests(1), timeout=60)
            metrics = svc.metrics()
    assert result.failed and result.failure_reason.startswith("http_500")
    assert "after 3 attempt(s)" in result.failure_reason
    assert metrics["judge/requests"] == 1 and metrics["judge/retries"] == 2
    assert server.stats["requests"] == 3


@pytest.mark.slow
def test_twenty_second_outage_with_default_settings():
    """The issue's case: 300 samples, server down 20 s, default judge settings. Before: 260 of
    300 failed (defaults give 7.5-15 s of backoff per request)."""
    with FakeOpenAIServer(latency_s=0.01) as server:
        cfg = judge_cfg(server)  # defaults: 4 retries, 1 s backoff, outage_timeout_s 600
        results, metrics, down_s = run_with_outage(server, cfg, 300, 20.0, after_requests=100)
    failed = [r for r in results if r.failed]
    print(f"{len(failed)} of 300 failed; server down {down_s:.1f} s; judge {metrics}")
    assert down_s >= 20.0
    assert not failed, failed[0].failure_reason


def test_a_late_answer_from_before_the_outage_does_not_close_the_breaker():
    """Requests sent before the server went down may still be answered (or see their connection
    dropped) after the first refused connect opened the breaker. Those answers say nothing about
    the server now; only the probe's answer closes it. (CI once saw such late answers close it
    twice within one 3 s outage: 3 outages and 143 refused connects.)"""
    import asyncio

    from megatron_vcap.rewards.judges.breaker import CircuitBreaker

    now = [100.0]
    breaker = CircuitBreaker(outage_timeout_s=600, first_interval_s=1.0, clock=lambda: now[0])

    async def scenario():
        breaker.unreachable(probe=False)  # first refused connect: open
        assert breaker.is_open and breaker.outages == 1
        breaker.reached(probe=False)  # a late answer to a request sent before the outage
        assert breaker.is_open
        now[0] += 1.0  # the first probe is due
        assert await breaker.acquire() is True
        breaker.reached(probe=True)  # the probe got through: closed
        assert not breaker.is_open and breaker.outages == 1
        assert await breaker.acquire() is False  # requests flow again, not as probes

    asyncio.run(scenario())
