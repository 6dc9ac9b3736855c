"""Escore / CNscore math (hand-computed, step boundaries exactly at δ1 and δ2) and answer validation."""

from __future__ import annotations

import json

import pytest

from megatron_vcap.rewards.caption import (
    compute_cnscore,
    compute_coverage,
    compute_escore,
    compute_step_score,
)
from megatron_vcap.rewards.prompts import (
    InvalidAnswer,
    build_entailment_task,
    build_extract_events_task,
    build_rating_task,
    build_structure_task,
    read_payload,
)
from megatron_vcap.structure import Subject


def verdicts(entailed: int, total: int, other: str = "neutral") -> list[str]:
    return ["entailment"] * entailed + [other] * (total - entailed)


@pytest.mark.parametrize(
    "entailed, total, expected",
    [
        (0, 10, 0.0),
        (6, 25, 0.0),  # 0.24 < δ1
        (27, 100, 0.0),  # 0.27: just under δ1
        (7, 25, 0.5),  # coverage exactly 0.28 = δ1 -> middle step
        (14, 50, 0.5),  # 0.28 again, other fraction
        (34, 100, 0.5),  # 0.34: just under δ2
        (7, 20, 1.0),  # coverage exactly 0.35 = δ2 -> top step
        (35, 100, 1.0),
        (1, 1, 1.0),
    ],
)
def test_escore_step_boundaries(entailed, total, expected):
    score, metrics = compute_escore(
        verdicts(entailed, total), mode="step", delta1=0.28, delta2=0.35
    )
    assert metrics["coverage"] == pytest.approx(entailed / total)
    assert score == expected


def test_step_score_with_other_deltas():
    assert compute_step_score(0.5, 0.5, 0.8) == 0.5
    assert compute_step_score(0.8, 0.5, 0.8) == 1.0
    assert compute_step_score(0.49, 0.5, 0.8) == 0.0


def test_contradiction_and_neutral_do_not_count():
    v = ["entailment", "contradiction", "neutral", "entailment"]
    assert compute_coverage(v) == 0.5
    # Issue 14, item 8: an empty list is nothing to miss -> 1.0 (DREAM-1K AutoDQ).
    assert compute_coverage([]) == 1.0
    assert compute_escore([], mode="step") == (1.0, {"coverage": 1.0})
    # f1: a caption with no events of its own has precision 1.0 on that side.
    score, m = compute_escore(verdicts(1, 2), mode="f1", precision_verdicts=[])
    assert m == {"coverage": 0.5, "precision": 1.0} and score == pytest.approx(2 * 0.5 / 1.5)


def test_escore_linear_and_f1_by_hand():
    score, _ = compute_escore(verdicts(3, 8), mode="linear")
    assert score == pytest.approx(0.375)
    # recall 3/8, precision 2/4 -> F1 = 2 * 0.5 * 0.375 / 0.875 = 0.428571...
    score, m = compute_escore(verdicts(3, 8), mode="f1", precision_verdicts=verdicts(2, 4))
    assert m == {"coverage": 0.375, "precision": 0.5}
    assert score == pytest.approx(0.375 / 0.875)
    assert compute_escore(verdicts(0, 3), mode="f1", precision_verdicts=[])[0] == 0.0
    with pytest.raises(ValueError, match="precision_verdicts"):
        compute_escore(verdicts(1, 2), mode="f1")
    with pytest.raises(ValueError, match="unknown verdict"):
        compute_escore(["yes"], mode="linear")


def test_cnscore():
    assert compute_cnscore(7, 8) == 0.75
    assert compute_cnscore(0, 0) == 0.0 and compute_cnscore(10, 10) == 1.0
    with pytest.raises(ValueError, match="coverage"):
        compute_cnscore(11, 5)


# ---------------------------------------------------------------- answer validation
def test_tasks_ask_for_json_schema_and_carry_their_payload():
    task = build_entailment_task("A dog runs.", ["The dog runs.", "A cat sits."])
    fmt = task.response_format()
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["verdicts"]["maxItems"] == 2
    assert read_payload(list(task.messages)) == {
        "description": "A dog runs.",
        "events": ["The dog runs.", "A cat sits."],
    }
    extract = build_extract_events_task("x", 10)
    assert "At most 10 events" in extract.messages[0]["content"]
    assert (
        "pronouns" in extract.messages[0]["content"] and "camera" in extract.messages[0]["content"]
    )


@pytest.mark.parametrize(
    "answer, message",
    [
        ([], "expected a JSON object"),
        ({}, "missing key"),
        ({"verdicts": "all"}, "expected 2 entries"),
        ({"verdicts": [{"index": 0, "verdict": "entailment"}]}, "expected 2 entries"),
        (
            {
                "verdicts": [
                    {"index": 0, "verdict": "entailment"},
                    {"index": 0, "verdict": "neutral"},
                ]
            },
            "repeated",
        ),
        (
            {
                "verdicts": [
                    {"index": 0, "verdict": "entailment"},
                    {"index": 5, "verdict": "neutral"},
                ]
            },
            "out of range",
        ),
        (
            {"verdicts": [{"index": 0, "verdict": "yes"}, {"index": 1, "verdict": "neutral"}]},
            "not in",
        ),
        (
            {
                "verdicts": [
                    {"index": True, "verdict": "neutral"},
                    {"index": 1, "verdict": "neutral"},
                ]
            },
            "integer",
        ),
        ({"verdicts": [{"verdict": "neutral"}, {"index": 1, "verdict": "neutral"}]}, "missing key"),
    ],
)
def test_entailment_answers_are_validated(answer, message):
    task = build_entailment_task("A dog runs.", ["The dog runs.", "A cat sits."])
    with pytest.raises(InvalidAnswer, match=message):
        task.parse(answer)


def test_entailment_answer_out_of_order_is_reordered_and_case_folded():
    task = build_entailment_task("p", ["a", "b"])
    answer = {
        "verdicts": [{"index": 1, "verdict": "Neutral"}, {"index": 0, "verdict": "ENTAILMENT"}]
    }
    assert task.parse(json.loads(json.dumps(answer))) == ["entailment", "neutral"]


def test_other_validators():
    events = build_extract_events_task("x", 2)
    assert events.parse({"events": [" a ", "", "b"]}) == ["a", "b"]
    with pytest.raises(InvalidAnswer, match="at most 2"):
        events.parse({"events": ["a", "b", "c"]})
    with pytest.raises(InvalidAnswer, match="list of strings"):
        events.parse({"events": [1]})
    rating = build_rating_task("ref", "cand")
    assert rating.parse({"coverage": 7, "naturalness": 8.0}) == (7, 8)
    for bad in (
        {"coverage": 11, "naturalness": 1},
        {"coverage": "7", "naturalness": 1},
        {"coverage": 7},
    ):
        with pytest.raises(InvalidAnswer):
            rating.parse(bad)
    structure = build_structure_task("x")
    assert structure.parse(
        {"subjects": [{"description": "a dog", "attributes": ["brown"], "actions": []}]}
    ) == [Subject("a dog", ["brown"], [])]
    with pytest.raises(InvalidAnswer, match=r"subjects\[0\].description"):
        structure.parse({"subjects": [{"description": "", "attributes": [], "actions": []}]})
    with pytest.raises(InvalidAnswer, match="non-empty"):
        structure.parse({"subjects": []})
