"""Judge on any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API) via ``openai``.

Async, with bounded concurrency (a semaphore held only while a request is in flight, never
during a backoff sleep), a per-request timeout, and its own retry loop (the client's is off so
that every retry is counted and malformed answers are retried too): HTTP 5xx, 408/409, 429 (with
``Retry-After`` honoured), timeouts, connection errors, invalid JSON and answers that fail
validation are retried with exponential backoff and jitter; other 4xx fail at once. The API key
is read from the environment variable named in the config and is never logged or stored.
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


def _retry_after(exc: openai.APIStatusError) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds form only), if the server sent one."""
    try:
        value = exc.response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, ValueError):
        return None


def _classify(exc: Exception) -> tuple[str, bool, float | None]:
    """(failure code, retryable, server-requested delay) for an exception from one attempt."""
    if isinstance(exc, openai.APITimeoutError):  # subclass of APIConnectionError: test first
        return "timeout", True, None
    if isinstance(exc, openai.APIConnectionError):
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
            return dict(self._stats)

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

    async def _request(self, task: JudgeTask) -> str:
        """One chat completion; returns the message content (not yet parsed)."""
        if self._sem is None:  # created on first use, inside the loop that runs the judge
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        body = {
            "model": self.cfg.model,
            "messages": list(task.messages),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        fmt = task.response_format()
        if fmt is not None:
            body["response_format"] = fmt
        async with self._sem:
            self._count("requests")
            # The client's documented raw-request path: same endpoint, auth, timeouts and error
            # types as ``chat.completions.create`` without its typed request transform and
            # response models, which cost a third of the client CPU per request at high
            # concurrency (tools/bench_rewards.py); the envelope is checked here instead.
            data = await self._client.post("/chat/completions", cast_to=object, body=body)
        return message_content(data)

    async def run(self, task: JudgeTask) -> Any:
        """One validated answer for ``task``: from the cache, or asked with retries."""
        key = None
        if self._cache is not None:
            key = cache_key(
                self.cfg.model,
                task.messages,
                task.schema,
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
            )
            cached = self._cache.get(key)
            if cached is not None:
                try:
                    value = task.parse(task.decode_text(cached))
                    self._count("cache_hits")
                    return value
                except (ValueError, InvalidAnswer):
                    log.warning("judge cache: entry %s no longer validates; asking again", key)
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            try:
                text = await self._request(task)
                value = task.parse(task.decode_text(text))
            except Exception as exc:
                code, retryable, requested = _classify(exc)
                self._count(f"errors/{code}")
                if not retryable or attempt == attempts - 1:
                    self._count(f"failed/{code}")
                    raise JudgeError(
                        code, f"{task.name} after {attempt + 1} attempt(s): {str(exc)[:200]}"
                    ) from None
                self._count("retries")
                await asyncio.sleep(self._backoff(attempt, requested))
                continue
            if self._cache is not None:
                self._cache.put(key, text, self.cfg.model)
            return value
        raise AssertionError("unreachable")

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
