"""The judge interface: semantic primitives (entail, extract, rate) and batch caption judging.

A judge answers four questions: which events a text entails, what a caption's atomic events are,
how a caption rates against a reference (CNscore), and what a caption's subject structure is
(dataset annotation). ``judge_captions`` runs everything a batch of captions needs and never
raises for one sample: a sample whose judging failed after retries comes back as a
``Judgment`` with ``error`` set to ``"<code>: <detail>"``, in the same position it was given.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from megatron_vcap.structure import Subject

log = logging.getLogger(__name__)


class JudgeError(Exception):
    """A judge call that failed for good; ``code`` is short and stable (a metric key)."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass
class CaptionJob:
    caption: str  # the model's caption
    reference: str  # ground-truth caption
    events: list[str]  # ground-truth events


@dataclass
class Judgment:
    """Raw judge output for one caption; ``error`` set means the judging failed."""

    verdicts: list[str] | None = None  # one per ground-truth event, caption as premise
    caption_events: list[str] | None = None  # escore f1: events extracted from the caption
    precision_verdicts: list[str] | None = None  # escore f1: those events vs the reference
    rating: tuple[int, int] | None = None  # cnscore: (coverage, naturalness), 0-10 each
    error: str | None = None


def failure_code(reason: str | None) -> str | None:
    """``'timeout: after 5 attempts ...'`` -> ``'timeout'`` (the metric key of a failure)."""
    return None if reason is None else reason.split(":", 1)[0].strip()


class Judge(ABC):
    """Base class; subclasses implement the four primitives (async, may raise JudgeError)."""

    name = "judge"
    # True for judges that approximate entailment without a language model.
    approximate = False

    @abstractmethod
    async def entail(self, premise: str, hypotheses: list[str]) -> list[str]:
        """One verdict (entailment / neutral / contradiction) per hypothesis."""

    @abstractmethod
    async def extract_events(self, caption: str) -> list[str]:
        """At most ``max_events`` atomic events of a caption."""

    @abstractmethod
    async def rate(self, reference: str, caption: str) -> tuple[int, int]:
        """(coverage, naturalness), each an integer 0-10."""

    @abstractmethod
    async def extract_structure(self, caption: str) -> list[Subject]:
        """The subjects (description, attributes, actions) a caption describes."""

    def stats(self) -> dict[str, int]:
        """Counters for metrics (calls, retries, cache hits, failures by code)."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most judges hold nothing
        """Release network clients and the like."""

    async def judge_captions(
        self, jobs: list[CaptionJob], *, caption_score: str, escore_mode: str
    ) -> list[Judgment]:
        """Everything ``caption_score`` / ``escore_mode`` need, for each job, concurrently."""
        return list(
            await asyncio.gather(*(self._judge_one(j, caption_score, escore_mode) for j in jobs))
        )

    async def _judge_one(self, job: CaptionJob, caption_score: str, escore_mode: str) -> Judgment:
        try:
            if caption_score == "cnscore":
                return Judgment(rating=await self.rate(job.reference, job.caption))
            # No reference events: recall is 1.0 (compute_coverage), no request needed.
            if escore_mode != "f1":
                return Judgment(verdicts=await self.entail(job.caption, job.events))
            verdicts, caption_events = await asyncio.gather(
                self.entail(job.caption, job.events), self.extract_events(job.caption)
            )
            precision = await self.entail(job.reference, caption_events) if caption_events else []
            return Judgment(
                verdicts=verdicts, caption_events=caption_events, precision_verdicts=precision
            )
        except JudgeError as exc:
            return Judgment(error=str(exc))
        except Exception as exc:  # a bug must not lose the sample or stop the trainer
            log.exception("judge %s raised on one sample", self.name)
            return Judgment(error=f"judge_error: {type(exc).__name__}: {exc}")
