"""Judge on any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API) via ``openai``.

Async, with bounded concurrency (a semaphore held only while a request is in flight, never
during a backoff sleep), a per-request timeout, and its own retry loop (the client's is off so
that every retry is counted and malformed answers are retried too): HTTP 5xx, 408/409, 429 (with
``Retry-After`` honoured), timeouts, dropped connections, invalid JSON and answers that fail
validation are retried with exponential backoff and jitter, up to ``max_retries`` per request;
other 4xx fail at once. A refused connection is not the request's fault: it opens a circuit
breaker (``breaker.py``) and the request waits for the server, up to ``outage_timeout_s`` shared
by all requests, without spending its retries. Identical tasks in flight together are sent once.
The API key is read from the environment variable named in the config and is never logged or
stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from collections import Counter
from typing import Any

import openai

from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.rewards.judges.base import Judge, JudgeError
from megatron_vcap.rewards.judges.breaker import CircuitBreaker, ServerUnreachable
from megatron_vcap.rewards.judges.cache import AnswerCache, cache_key
from megatron_vcap.rewards.prompts import (
    InvalidAnswer,
    JudgeTask,
    build_entailment_task,
    build_extract_events_task,
    build_rating_task,
    build_structure_task,
)
from megatron_vcap.structure import Subject

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 409, 429}


class _WaitForServer(Exception):
    """Raised (and caught) inside the judge: the breaker opened while a request queued."""


def _retry_after(exc: openai.APIStatusError) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds form only), if the server sent one."""
    try:
        value = exc.response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, ValueError):
        return None


def _connect_failed(exc: BaseException) -> bool:
    """True when the connection itself could not be made (refused, no route, no such host).

    Matched by the transport's class name: ``openai`` wraps its HTTP library's ``ConnectError``
    (``httpx``, or the copy newer releases ship as ``httpx2``) as ``APIConnectionError``.
    """
    seen, cur = 0, exc.__cause__ or exc.__context__
    while cur is not None and seen < 8:
        if type(cur).__name__ == "ConnectError" or isinstance(cur, ConnectionRefusedError):
            return True
        seen, cur = seen + 1, cur.__cause__ or cur.__context__
    return False


def _classify(exc: Exception) -> tuple[str, bool, float | None]:
    """(failure code, retryable, server-requested delay) for an exception from one attempt."""
    if isinstance(exc, openai.APITimeoutError):  # subclass of APIConnectionError: test first
        return "timeout", True, None
    if isinstance(exc, openai.APIConnectionError):
        # Refused (nothing listening, DNS): the server is away, every request would fail the
        # same way. Dropped mid-request: a per-request failure like an HTTP 500.
        if _connect_failed(exc):
            return "server_unreachable", True, None
        return "connection_error", True, None
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited", True, _retry_after(exc)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return f"http_{status}", status >= 500 or status in _RETRYABLE_STATUS, None
    if isinstance(exc, json.JSONDecodeError):
        return "malformed_json", True, None
    if isinstance(exc, InvalidAnswer):
        return "invalid_answer", True, None
    raise exc  # anything else is a bug: let the caller's safety net report it


def message_content(data: Any) -> str:
    """The first choice's message content of a chat-completion response body."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (TypeError, KeyError, IndexError):
        raise InvalidAnswer(f"not a chat completion: {str(data)[:200]!r}") from None
    if not isinstance(content, str):
        raise InvalidAnswer("the answer has no message content")
    return content


class OpenAIJudge(Judge):
    """LLM judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, cfg: JudgeConfig):
        cfg.validate()
        self.cfg = cfg
        self.name = f"openai:{cfg.model}"
        key = os.environ.get(cfg.api_key_env, "")
        if not key:
            # Local vLLM / SGLang servers accept any key; hosted APIs will answer 401.
            log.warning(
                "judge: environment variable %s is not set; sending a placeholder key",
                cfg.api_key_env,
            )
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=key or "EMPTY", timeout=cfg.timeout_s, max_retries=0
        )
        self._sem: asyncio.Semaphore | None = None
        self._cache = AnswerCache(cfg.cache_dir) if cfg.cache_dir else None
        self._breaker = CircuitBreaker(cfg.outage_timeout_s, cfg.backoff_s)
        self._in_flight: dict[str, asyncio.Future] = {}  # cache key -> the first asker's answer
        self._stats: Counter = Counter()
        self._stats_lock = threading.Lock()  # read from the trainer thread, written in the loop
        log.info(
            "judge: %s at %s, concurrency %d, timeout %.1fs, %d retries, cache %s",
            cfg.model,
            cfg.base_url,
            cfg.concurrency,
            cfg.timeout_s,
            cfg.max_retries,
            cfg.cache_dir or "off",
        )

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            out = dict(self._stats)
        if self._breaker.outages:
            out["outages"] = self._breaker.outages
        return out

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    async def aclose(self) -> None:
        await self._client.close()

    def _backoff(self, attempt: int, requested: float | None) -> float:
        base = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt)
        delay = base * (0.5 + random.random() / 2)  # jitter spreads retries of a failed burst
        if requested is not None:
            delay = max(delay, min(requested, self.cfg.max_backoff_s))
        return delay

    async def _request(self, task: JudgeTask, probe: bool, label: str) -> str:
        """One chat completion; returns the message content (not yet parsed)."""
        if self._sem is None:  # created on first use, inside the loop that runs the judge
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        body = {
            "model": self.cfg.model,
            "messages": list(task.messages),
            "max_tokens": self.cfg.max_tokens,
        }
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        fmt = task.response_format()
        if fmt is not None:
            body["response_format"] = fmt
        async with self._sem:
            if self._breaker.is_open and not probe:
                raise _WaitForServer  # the server went away while this one queued for a slot
            self._count("attempts")
            self._count(label)
            # The client's documented raw-request path: same endpoint, auth, timeouts and error
            # types as ``chat.completions.create`` without its typed request transform and
            # response models, which cost a third of the client CPU per request at high
            # concurrency (tools/bench_rewards.py); the envelope is checked here instead.
            data = await self._client.post("/chat/completions", cast_to=object, body=body)
        return message_content(data)

    def _key(self, task: JudgeTask) -> str:
        return cache_key(
            self.cfg.model,
            task.messages,
            task.schema,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )

    async def run(self, task: JudgeTask) -> Any:
        """One validated answer for ``task``: from the cache, or asked with retries.

        Identical tasks in flight at the same time are asked once: later callers wait for the
        first one's answer (or its failure).
        """
        key = self._key(task)
        pending = self._in_flight.get(key)
        if pending is not None:
            self._count("deduplicated")
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            value = await self._cached_or_ask(task, key)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning without joiners
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._in_flight[key]

    async def _cached_or_ask(self, task: JudgeTask, key: str) -> Any:
        if self._cache is not None:
            cached = self._cache.get(key)
            if cached is not None:
                try:
                    value = task.parse(task.decode_text(cached))
                    self._count("cache_hits")
                    return value
                except (ValueError, InvalidAnswer):
                    log.warning("judge cache: entry %s no longer validates; asking again", key)
        text, value = await self._ask(task)
        if self._cache is not None:
            self._cache.put(key, text, self.cfg.model)
        return value

    async def _ask(self, task: JudgeTask) -> tuple[str, Any]:
        """Send ``task`` until it has a valid answer; (answer text, parsed value).

        Two budgets: answers and errors the server sends (and timeouts) use the request's own
        ``max_retries``; refused connections use the breaker's shared ``outage_timeout_s``.
        Sends are counted as ``requests`` (first), ``retries`` (after a server-side failure)
        and ``reconnects`` (after a refused connection); ``attempts`` is their sum.
        """
        failures, label = 0, "requests"
        while True:
            try:
                probe = await self._breaker.acquire()
            except ServerUnreachable as exc:
                self._count("failed/server_unreachable")
                raise JudgeError("server_unreachable", f"{task.name}: {exc}") from None
            try:
                text = await self._request(task, probe, label)
            except _WaitForServer:
                continue
            except Exception as exc:
                error = exc
                code, retryable, requested = _classify(exc)
                self._count(f"errors/{code}")
                if code == "server_unreachable":
                    self._breaker.unreachable(probe)
                    if self._breaker.expired:
                        self._count("failed/server_unreachable")
                        raise JudgeError(
                            code, f"{task.name}: no connection for {self.cfg.outage_timeout_s:.0f}"
                            " s (judge.outage_timeout_s)"
                        ) from None  # fmt: skip
                    label = "reconnects"
                    continue
                self._breaker.reached(probe)
            else:
                self._breaker.reached(probe)
                try:
                    return text, task.parse(task.decode_text(text))
                except Exception as exc:
                    error = exc
                    code, retryable, requested = _classify(exc)
                    self._count(f"errors/{code}")
            finally:
                self._breaker.release(probe)  # no-op unless cancelled mid-probe
            if not retryable or failures >= self.cfg.max_retries:
                self._count(f"failed/{code}")
                raise JudgeError(
                    code, f"{task.name} after {failures + 1} attempt(s): {str(error)[:200]}"
                ) from None
            failures, label = failures + 1, "retries"
            await asyncio.sleep(self._backoff(failures - 1, requested))

    async def entail(self, premise: str, hypotheses: list[str]) -> list[str]:
        if not hypotheses:
            return []
        return await self.run(build_entailment_task(premise, hypotheses))

    async def extract_events(self, caption: str) -> list[str]:
        return await self.run(build_extract_events_task(caption, self.cfg.max_events))

    async def rate(self, reference: str, caption: str) -> tuple[int, int]:
        return await self.run(build_rating_task(reference, caption))

    async def extract_structure(self, caption: str) -> list[Subject]:
        return await self.run(build_structure_task(caption))
