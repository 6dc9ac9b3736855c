"""The embedded judge: no server, no language model — an APPROXIMATION of the LLM judge.

Entailment is approximated by sentence-embedding similarity (all-MiniLM-L6-v2): an event counts
as entailed when its best cosine similarity against the premise's sentences and clauses reaches
``entail_threshold``; there is no contradiction detection (every other event is "neutral").
Event extraction splits a caption into clauses; the CNscore rating uses the clause coverage of
the reference and a repetition heuristic for naturalness; structure extraction is not offered.
It is the offline default for the CPU demo and tests; real training should use an LLM judge.

Work for a whole batch is done in one encode call on a worker thread, and embeddings (of the
reference events above all, which repeat across the G samples of a group and across epochs) are
kept in an LRU cache shared with the embedding think-score backend.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import Executor
from functools import partial

from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.rewards.judges.base import CaptionJob, Judge, JudgeError, Judgment
from megatron_vcap.rewards.similarity import EmbeddingCache
from megatron_vcap.structure import Subject

log = logging.getLogger(__name__)

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
# Clause boundaries inside a sentence: "; ", ", and ", " and then ", " while ", " before " ...
_CLAUSE = re.compile(
    r";\s+|,\s*(?:and\s+then|and|then|while|before|after|as|but)\s+|\s+(?:and\s+then|while|"
    r"before|after|then)\s+",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z0-9']+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def split_units(text: str) -> list[str]:
    """Sentences of ``text`` and their clauses (at least two words each), de-duplicated."""
    units: list[str] = []
    for sentence in split_sentences(text):
        units.append(sentence)
        clauses = [c.strip(" ,.;") for c in _CLAUSE.split(sentence)]
        if len(clauses) > 1:
            units.extend(c for c in clauses if len(c.split()) >= 2)
    return list(dict.fromkeys(units))


def compute_naturalness(text: str) -> float:
    """Heuristic fluency in [0, 1]: distinct-trigram ratio, scaled down for fragments.

    A stand-in for a judge's naturalness rating: it only catches repetition and list-like or
    very short output.
    """
    words = _WORD.findall(text.lower())
    if len(words) < 4:
        return 0.0
    trigrams = list(zip(words, words[1:], words[2:]))
    distinct = len(set(trigrams)) / len(trigrams)
    sentence_like = 1.0 if re.search(r"[.!?]\s*$", text.strip()) else 0.8
    return distinct * sentence_like


class EmbeddedJudge(Judge):
    """Similarity-based stand-in for an LLM judge (see the module docstring)."""

    name = "embedded-approx(minilm-similarity)"
    approximate = True

    def __init__(self, cfg: JudgeConfig, cache: EmbeddingCache, executor: Executor | None = None):
        self.cfg = cfg
        self.cache = cache
        self.executor = executor
        self._calls = 0
        log.warning(
            "judge: using the EMBEDDED judge — entailment is approximated by sentence-embedding "
            "similarity (threshold %.2f), not judged by a language model",
            cfg.entail_threshold,
        )

    def stats(self) -> dict[str, int]:
        return {
            "batches": self._calls,
            "encode_calls": self.cache.encode_calls,
            "encoded_texts": self.cache.encoded_texts,
        }

    # ------------------------------------------------------------ synchronous core
    def entail_sync(self, premise: str, hypotheses: list[str]) -> list[str]:
        units = split_units(premise)
        if not hypotheses:
            return []
        if not units:
            return ["neutral"] * len(hypotheses)
        sim = self.cache.get(hypotheses) @ self.cache.get(units).T
        best = sim.max(axis=1)
        return ["entailment" if s >= self.cfg.entail_threshold else "neutral" for s in best]

    def extract_events_sync(self, caption: str) -> list[str]:
        clauses = []
        for sentence in split_sentences(caption):
            parts = [c.strip(" ,.;") for c in _CLAUSE.split(sentence)]
            clauses.extend(p for p in parts if len(p.split()) >= 2)
        return clauses[: self.cfg.max_events]

    def rate_sync(self, reference: str, caption: str) -> tuple[int, int]:
        ref_events = self.extract_events_sync(reference)
        verdicts = self.entail_sync(caption, ref_events)
        coverage = sum(v == "entailment" for v in verdicts) / max(1, len(verdicts))
        return int(round(10 * coverage)), int(round(10 * compute_naturalness(caption)))

    def _judge_batch_sync(
        self, jobs: list[CaptionJob], caption_score: str, escore_mode: str
    ) -> list[Judgment]:
        # One encode call for every text the batch needs; the per-job work then hits the cache.
        texts = []
        for job in jobs:
            texts += split_units(job.caption) + job.events
            if caption_score == "cnscore" or escore_mode == "f1":
                texts += split_units(job.reference) + self.extract_events_sync(job.caption)
                texts += self.extract_events_sync(job.reference)
        self.cache.encode(texts)
        self._calls += 1
        out = []
        for job in jobs:
            if caption_score == "cnscore":
                out.append(Judgment(rating=self.rate_sync(job.reference, job.caption)))
            elif escore_mode == "f1":
                events = self.extract_events_sync(job.caption)
                out.append(
                    Judgment(
                        verdicts=self.entail_sync(job.caption, job.events),
                        caption_events=events,
                        precision_verdicts=self.entail_sync(job.reference, events),
                    )
                )
            else:
                out.append(Judgment(verdicts=self.entail_sync(job.caption, job.events)))
        return out

    # ------------------------------------------------------------ async interface
    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def judge_captions(
        self, jobs: list[CaptionJob], *, caption_score: str, escore_mode: str
    ) -> list[Judgment]:
        if not jobs:
            return []
        return await self._off_loop(self._judge_batch_sync, jobs, caption_score, escore_mode)

    async def entail(self, premise: str, hypotheses: list[str]) -> list[str]:
        return await self._off_loop(self.entail_sync, premise, hypotheses)

    async def extract_events(self, caption: str) -> list[str]:
        return self.extract_events_sync(caption)

    async def rate(self, reference: str, caption: str) -> tuple[int, int]:
        return await self._off_loop(self.rate_sync, reference, caption)

    async def extract_structure(self, caption: str) -> list[Subject]:
        raise JudgeError(
            "unsupported",
            "the embedded judge cannot extract subject structures; use an LLM judge (openai)",
        )
