"""The reward service: rule scores at once, judge scores in the background.

The GRPO trainer calls ``submit`` right after generation and gets a ``RewardHandle``; it calls
``handle.result()`` only when it needs advantages. ``submit`` parses every response and computes
the format score and Tscore immediately (cheap, deterministic), then hands the caption judging
to an asyncio event loop on a background thread (network-bound judges run there concurrently;
the embedded judge's CPU work runs on a small worker pool), so the training loop never waits on
judge latency before it needs the numbers.

Nothing is lost: ``result()`` returns exactly one ``RewardResult`` per request, in submission
order. A sample whose judging failed after retries comes back with ``failed=True`` and the
reason; its caption score is 0 and whether it stays in the loss is the trainer's decision
(``reward.on_judge_failure``, applied with ``loss_mask``). ``summarize_results`` turns a batch
into metrics (means, stds, failure and parse-failure counts by reason).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rewards.caption import compute_cnscore, compute_escore
from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
from megatron_vcap.rewards.judges import CaptionJob, Judge, Judgment, build_judge
from megatron_vcap.rewards.judges.base import failure_code
from megatron_vcap.rewards.parser import ParsedResponse, parse_response
from megatron_vcap.rewards.similarity import (
    EmbeddingCache,
    EmbeddingSimilarity,
    LexicalSimilarity,
)
from megatron_vcap.rewards.think import compute_format_score, compute_tscore, texts_of
from megatron_vcap.structure import Subject

log = logging.getLogger(__name__)


@dataclass
class RewardRequest:
    sample_id: str
    response: str  # the model's full response text
    caption: str  # ground-truth caption
    subjects: list[Subject]  # ground-truth structure
    events: list[str]  # ground-truth events


@dataclass
class RewardResult:
    sample_id: str
    format: float
    think: float
    caption: float
    total: float
    failed: bool = False  # the judge failed for this sample after retries
    failure_reason: str | None = None  # "<code>: <detail>" when failed
    parse_failure: str | None = None  # the parser's failure code, if the response is malformed
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loss_mask(results: list[RewardResult], on_judge_failure: str) -> list[bool]:
    """Which samples enter the loss: all, except judge failures under the ``drop`` policy."""
    if on_judge_failure not in ("drop", "zero"):
        raise ValueError(f"on_judge_failure: expected 'drop' or 'zero', got {on_judge_failure!r}")
    return [not (r.failed and on_judge_failure == "drop") for r in results]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize_results(results: list[RewardResult]) -> dict[str, float]:
    """Metrics of one batch: mean/std per component, failure counts by reason.

    Caption and total statistics skip judge-failed samples (they have no caption score); format
    and think cover every sample; a statistic with no samples is left out (not NaN, which would
    poison averages over ranks). Keys carry no prefix (the trainer logs them under ``reward/``):
    ``count``, ``judge_failed_count``, ``judge_failure/timeout_count``,
    ``parse_failure/no_think_block_count``, ... Each value is a ``Metric`` declaring its merge
    over ranks: counts sum, means are weighted by their samples, stds are averaged.
    """
    from megatron_vcap.trainer.metrics import Metric

    out: dict[str, float] = {"count": Metric(len(results), "sum")}
    ok = [r for r in results if not r.failed]
    for name in ("format", "think", "caption", "total"):
        pool = results if name in ("format", "think") else ok
        if pool:
            mean, std = _mean_std([getattr(r, name) for r in pool])
            out[f"{name}_mean"] = Metric(mean, "weighted_mean", len(pool))
            out[f"{name}_std"] = Metric(std, "mean")
    coverage = [r.details["coverage"] for r in ok if "coverage" in r.details]
    if coverage:
        out["coverage_mean"] = Metric(sum(coverage) / len(coverage), "weighted_mean", len(coverage))
    out["judge_failed_count"] = Metric(len(results) - len(ok), "sum")
    for code, n in Counter(failure_code(r.failure_reason) for r in results if r.failed).items():
        out[f"judge_failure/{code}_count"] = Metric(n, "sum")
    parse_failures = Counter(r.parse_failure for r in results if r.parse_failure)
    out["parse_failed_count"] = Metric(sum(parse_failures.values()), "sum")
    for code, n in parse_failures.items():
        out[f"parse_failure/{code}_count"] = Metric(n, "sum")
    return out


def load_custom_reward(spec: str):
    """``"package.module:function"`` -> the function (None for an empty spec)."""
    if not spec:
        return None
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward.custom_fn: cannot load {spec!r} ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"reward.custom_fn: {spec!r} is not callable")
    return fn


@dataclass
class _Scored:
    """Rule-score state of one request between submit and result."""

    request: RewardRequest
    parsed: ParsedResponse
    format: float
    think: float
    think_details: dict[str, Any]
    job_index: int | None  # position in the judge batch, None if not judged (no caption)
    custom: float = 0.0  # the configured custom rule reward (0 without one)


class RewardHandle:
    """The pending scores of one submitted batch."""

    def __init__(self, service: RewardService, scored: list[_Scored], future: ConcurrentFuture):
        self._service = service
        self._scored = scored
        self._future = future
        self._results: list[RewardResult] | None = None

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        """One result per request, in submission order; TimeoutError if not done in time."""
        if self._results is None:
            n_jobs = sum(s.job_index is not None for s in self._scored)
            try:
                judgments = self._future.result(timeout)
            except TimeoutError:
                if not self._future.done():  # still running: the caller's wait timed out
                    raise
                judgments = [Judgment(error="judge_error: the judge batch timed out")] * n_jobs
            except CancelledError:
                judgments = [Judgment(error="cancelled: the reward service was closed")] * n_jobs
            except Exception as exc:  # a judge bug: report it on every sample, lose none
                log.exception("reward judge batch failed")
                judgments = [Judgment(error=f"judge_error: {type(exc).__name__}: {exc}")] * n_jobs
            if len(judgments) != n_jobs:
                reason = f"judge_error: {len(judgments)} judgments for {n_jobs} captions"
                judgments = [Judgment(error=reason)] * n_jobs
            self._results = [
                self._service._finish(s, None if s.job_index is None else judgments[s.job_index])
                for s in self._scored
            ]
        return list(self._results)


class RewardService:
    """Scores responses: parser + rule rewards in the caller's thread, judge in the background."""

    def __init__(
        self, reward_cfg: RewardConfig, judge_cfg: JudgeConfig, judge: Judge | None = None
    ):
        reward_cfg.validate()
        judge_cfg.validate()
        self.cfg = reward_cfg
        self.judge_cfg = judge_cfg
        self._executor = ThreadPoolExecutor(reward_cfg.num_workers, thread_name_prefix="reward")
        embeddings = None
        if reward_cfg.think_backend == "embedding" or (
            judge is None and judge_cfg.kind == "embedded"
        ):
            # One cache for both users: the think backend and the embedded judge.
            embeddings = EmbeddingCache(reward_cfg.embedding_model, reward_cfg.embedding_batch_size)
        if reward_cfg.think_backend == "embedding":
            self.similarity = EmbeddingSimilarity(embeddings)
        else:
            self.similarity = LexicalSimilarity()
        self.judge = judge or build_judge(judge_cfg, embeddings, self._executor)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="reward-judge", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._counts: Counter = Counter()
        self.custom_fn = load_custom_reward(reward_cfg.custom_fn)

    # ---------------------------------------------------------------- rule scores
    def _rule_scores(
        self,
        requests: list[RewardRequest],
        parsed: list[ParsedResponse],
        job_index: list[int | None],
    ) -> list[_Scored]:
        texts = []
        for r, p in zip(requests, parsed):
            if p.ok:
                texts += texts_of(p.subjects) + texts_of(r.subjects)
        self.similarity.prepare(texts)  # one batched encode for the embedding backend
        scored = []
        for r, p, j in zip(requests, parsed, job_index):
            think, think_details = 0.0, {}
            if p.ok:
                t = compute_tscore(
                    p.subjects,
                    r.subjects,
                    self.similarity,
                    subject_threshold=self.cfg.subject_threshold,
                    item_threshold=self.cfg.item_threshold,
                )
                think = t.score
                think_details = {
                    "attribute_f1": t.attribute_f1,
                    "action_f1": t.action_f1,
                    **t.counts,
                }
            custom = float(self.custom_fn(r.response, r)) if self.custom_fn else 0.0
            scored.append(_Scored(r, p, compute_format_score(p), think, think_details, j, custom))
        return scored

    # ---------------------------------------------------------------- submit / finish
    def submit(self, requests: list[RewardRequest]) -> RewardHandle:
        """Start scoring a batch; returns at once with rule scores done and the judge running."""
        if self._closed:
            raise RuntimeError("RewardService.submit after close()")
        requests = list(requests)
        parsed = [parse_response(r.response) for r in requests]
        jobs: list[CaptionJob] = []
        job_index: list[int | None] = []
        for r, p in zip(requests, parsed):
            if p.caption is None:  # nothing to judge; the caption score is 0
                job_index.append(None)
            else:
                job_index.append(len(jobs))
                jobs.append(CaptionJob(p.caption, r.caption, list(r.events)))
        coro = self.judge.judge_captions(
            jobs, caption_score=self.cfg.caption_score, escore_mode=self.cfg.escore_mode
        )
        # The judge starts first: its latency overlaps the think scores computed below.
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        scored = self._rule_scores(requests, parsed, job_index)
        self._counts["submitted"] += len(scored)
        self._counts["judged"] += len(jobs)
        return RewardHandle(self, scored, future)

    def score(
        self, requests: list[RewardRequest], timeout: float | None = None
    ) -> list[RewardResult]:
        """Blocking convenience: ``submit(requests).result(timeout)``."""
        return self.submit(requests).result(timeout)

    def _caption_score(self, judgment: Judgment) -> tuple[float, dict[str, Any]]:
        if self.cfg.caption_score == "cnscore":
            coverage, naturalness = judgment.rating
            details = {"coverage_rating": coverage, "naturalness_rating": naturalness}
            return compute_cnscore(coverage, naturalness), details
        score, metrics = compute_escore(
            judgment.verdicts,
            mode=self.cfg.escore_mode,
            delta1=self.cfg.escore_delta1,
            delta2=self.cfg.escore_delta2,
            precision_verdicts=judgment.precision_verdicts,
        )
        details = {**metrics, "verdicts": list(judgment.verdicts)}
        if judgment.caption_events is not None:
            details["caption_events"] = list(judgment.caption_events)
        return score, details

    def _finish(self, s: _Scored, judgment: Judgment | None) -> RewardResult:
        details: dict[str, Any] = {"judge": self.judge.name, **s.think_details}
        caption, failed, reason = 0.0, False, None
        if judgment is None:
            details["caption_skipped"] = "no well-formed answer block"
        elif judgment.error is not None:
            failed, reason = True, judgment.error
        else:
            try:
                caption, extra = self._caption_score(judgment)
                details.update(extra)
            except (TypeError, ValueError) as exc:  # a judge broke its contract
                failed, reason = True, f"invalid_judgment: {exc}"
        if failed:
            self._counts[f"judge_failed/{failure_code(reason)}"] += 1
        total = (
            self.cfg.w_format * s.format + self.cfg.w_think * s.think + self.cfg.w_caption * caption
        )
        if self.custom_fn is not None:
            details["custom"] = s.custom
            total += self.cfg.w_custom * s.custom
        return RewardResult(
            sample_id=s.request.sample_id,
            format=s.format,
            think=s.think,
            caption=caption,
            total=total,
            failed=failed,
            failure_reason=reason,
            parse_failure=s.parsed.failure,
            details=details,
        )

    # ---------------------------------------------------------------- metrics / lifecycle
    def metrics(self) -> dict[str, float]:
        """Cumulative counters of this service and its judge (calls, retries, failures)."""
        out = {f"reward_service/{k}": float(v) for k, v in self._counts.items()}
        out.update({f"judge/{k}": float(v) for k, v in self.judge.stats().items()})
        return out

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.judge.aclose()

    def close(self) -> None:
        """Cancel unfinished judging (those samples come back failed), stop the loop."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        except Exception:  # shutting down: report, but never raise from close
            log.exception("reward service: error while shutting the judge down")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
