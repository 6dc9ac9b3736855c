"""The embedded (similarity-approximated) judge: splitting, verdicts, batching and caching."""

from __future__ import annotations

import asyncio

import pytest

from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.rewards.judges.base import CaptionJob, JudgeError
from megatron_vcap.rewards.judges.embedded import EmbeddedJudge, compute_naturalness, split_units
from megatron_vcap.rewards.similarity import EmbeddingCache


@pytest.fixture(scope="module")
def judge():
    return EmbeddedJudge(JudgeConfig(kind="embedded", max_events=3), EmbeddingCache())


def test_split_units_sentences_and_clauses():
    text = "A woman walks along the street, and then opens an umbrella. A dog barks; it runs away."
    assert split_units(text) == [
        "A woman walks along the street, and then opens an umbrella.",
        "A woman walks along the street",
        "opens an umbrella",
        "A dog barks; it runs away.",
        "A dog barks",
        "it runs away",
    ]
    assert split_units("   ") == []


def test_naturalness_heuristic_by_hand():
    assert compute_naturalness("A dog runs.") == 0.0  # fewer than 4 words
    # 6 words, 4 trigrams, all distinct, ends with a period -> 1.0
    assert compute_naturalness("A dog runs across the park.") == 1.0
    # "the dog the dog the dog": trigrams (the dog the), (dog the dog) x2 each -> 2 distinct / 4,
    # no final punctuation -> 0.5 * 0.8
    assert compute_naturalness("the dog the dog the dog") == pytest.approx(0.4)


def test_verdicts_follow_similarity(judge):
    caption = "A young woman in a yellow raincoat opens a red umbrella. A chef slices onions."
    events = ["The woman opens an umbrella.", "A dog barks at a car.", "The chef cuts onions."]
    assert judge.entail_sync(caption, events) == ["entailment", "neutral", "entailment"]
    assert judge.entail_sync("", events) == ["neutral"] * 3
    assert judge.extract_events_sync(
        "A dog runs, and then it jumps. A cat sleeps. A bird sings. X."
    ) == [
        "A dog runs",
        "it jumps",
        "A cat sleeps",
    ]  # capped at max_events = 3; one-word fragments dropped


def test_batch_is_one_encode_call_and_references_are_cached(judge):
    events = ["The woman opens an umbrella.", "A dog barks at a car."]
    jobs = [CaptionJob(f"A woman opens umbrella number {i}.", "ref", events) for i in range(16)]
    before = judge.cache.encode_calls
    out = asyncio.run(judge.judge_captions(jobs, caption_score="escore", escore_mode="step"))
    assert len(out) == 16 and all(j.verdicts[0] == "entailment" for j in out)
    assert judge.cache.encode_calls == before + 1
    # Same reference events, new captions: only the 4 new captions are encoded.
    texts_before = judge.cache.encoded_texts
    jobs = [CaptionJob(f"A man reads book {i}.", "ref", events) for i in range(4)]
    asyncio.run(judge.judge_captions(jobs, caption_score="escore", escore_mode="step"))
    assert judge.cache.encoded_texts == texts_before + 4


def test_failures_are_explicit(judge):
    (j,) = asyncio.run(
        judge.judge_captions(
            [CaptionJob("A dog runs.", "ref", [])], caption_score="escore", escore_mode="step"
        )
    )
    # No ground-truth events is not a failure (issue 14, item 8): no verdicts, coverage 1.0.
    assert j.error is None and j.verdicts == []
    with pytest.raises(JudgeError, match="cannot extract subject structures"):
        asyncio.run(judge.extract_structure("A dog runs."))
