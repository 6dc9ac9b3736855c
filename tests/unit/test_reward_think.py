"""Format score and Tscore: hand-computed cases for both similarity backends."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vcap.rewards.parser import parse_response
from megatron_vcap.rewards.similarity import (
    LexicalSimilarity,
    compute_lexical_similarity,
    content_tokens,
    stem_token,
)
from megatron_vcap.rewards.think import (
    compute_f1,
    compute_format_score,
    compute_tscore,
    match_one_to_one,
)
from megatron_vcap.structure import Subject, render_response

GT = [
    Subject(
        "a young woman in a yellow raincoat",
        ["long black hair", "yellow raincoat", "holds a red umbrella"],
        ["walks along the sidewalk", "opens the umbrella", "looks up at the sky"],
    ),
    Subject(
        "a small brown dog",
        ["brown fur", "blue collar"],
        ["runs beside the woman", "barks at a car"],
    ),
]
PRED = [
    Subject("a woman", ["black hair", "red umbrella"], ["walking on the sidewalk", "jumps"]),
    Subject("a cat", ["white fur"], ["sleeps"]),
]


def test_format_score():
    assert compute_format_score(parse_response(render_response(GT, "A woman walks."))) == 1.0
    assert compute_format_score(parse_response("<answer>A woman walks.</answer>")) == 0.0
    bad = "<think>Subject 1: a dog</think><answer>c</answer>"  # a header with no field
    assert compute_format_score(parse_response(bad)) == 0.0
    # Issue 14, item 8: one field is enough for a parseable subject (a missing one is empty).
    one_field = "<think>Subject 1: a dog\nAttributes: x</think><answer>c</answer>"
    assert compute_format_score(parse_response(one_field)) == 1.0


def test_lexical_tokens_and_similarity_by_hand():
    assert [
        stem_token(w)
        for w in [
            "walks",
            "walking",
            "walked",
            "running",
            "rolling",
            "carries",
            "glasses",
            "speed",
            "bus",
        ]
    ] == ["walk", "walk", "walk", "run", "roll", "carry", "glass", "speed", "bus"]
    assert content_tokens("The woman is walking on the sidewalk") == {
        "woman": 1,
        "walk": 1,
        "sidewalk": 1,
    }
    # {walk, along, sidewalk} vs {walk, sidewalk}: 2*2 / (3+2)
    a, b = content_tokens("walks along the sidewalk"), content_tokens("walking on the sidewalk")
    assert compute_lexical_similarity(a, b) == pytest.approx(0.8)
    assert compute_lexical_similarity(content_tokens("the"), content_tokens("the")) == 0.0


def test_match_one_to_one_is_optimal_not_greedy_and_respects_threshold():
    # Greedy would take (0,0)=0.9 and leave row 1 unmatched; the optimum matches both rows.
    sim = np.array([[0.9, 0.8], [0.85, 0.0]])
    assert match_one_to_one(sim, 0.5) == [(0, 1, 0.8), (1, 0, 0.85)]
    # Under the threshold nothing is matched, even if it is the best available.
    assert match_one_to_one(np.array([[0.49, 0.1]]), 0.5) == []
    assert match_one_to_one(np.zeros((0, 3)), 0.5) == []


def test_f1_edge_cases():
    assert compute_f1(0, 0, 0) == 1.0
    assert compute_f1(0, 3, 0) == 0.0
    assert compute_f1(2, 3, 5) == pytest.approx(0.5)


def test_tscore_lexical_by_hand():
    # Subjects: "a woman" {woman} vs gt0 {young, woman, yellow, raincoat}: 2/5 = 0.4 >= 0.3
    # -> matched; "a cat" matches nothing. Items (compute_item_similarity: min of weighted
    # Dice and coverage of the truth; verbs weigh 2, particles 0.5): "black hair" ~ "long black
    # hair" min(4/5, 2/3) = 0.667; "red umbrella" ~ "holds a red umbrella" min(4/6, 2/4) = 0.5
    # -> tp 2. Actions: "walking on the sidewalk" {walk 2, on .5, sidewalk 1} ~ "walks along the
    # sidewalk" {walk 2, along .5, sidewalk 1}: Dice 6/7, verb coverage 1, other words 1/1.5
    # -> 0.667, tp 1; "jumps" matches nothing.
    # Attributes: pred 3, gt 5 -> F1 = 4/8. Actions: pred 3, gt 5 -> F1 = 2/8. Tscore = 0.375.
    res = compute_tscore(PRED, GT, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.5)
    assert res.subject_pairs == [(0, 0)]
    assert res.attribute_f1 == pytest.approx(0.5)
    assert res.action_f1 == pytest.approx(0.25)
    assert res.score == pytest.approx(0.375)
    assert res.counts["attributes_tp"] == 2 and res.counts["actions_tp"] == 1


def test_tscore_thresholds_are_respected():
    # Raising the subject threshold above 0.4 unmatches the only pair: all items become FP/FN.
    res = compute_tscore(PRED, GT, LexicalSimilarity(), subject_threshold=0.45, item_threshold=0.5)
    assert res.subject_pairs == [] and res.score == 0.0
    # Raising the item threshold above 0.667 keeps the subject pair but no item matches.
    res = compute_tscore(PRED, GT, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.85)
    assert res.subject_pairs == [(0, 0)] and res.score == 0.0


def test_tscore_perfect_and_empty():
    sim = LexicalSimilarity()
    assert compute_tscore(GT, GT, sim, subject_threshold=0.3, item_threshold=0.5).score == 1.0
    assert compute_tscore([], GT, sim, subject_threshold=0.3, item_threshold=0.5).score == 0.0
    # Only hallucinated items: precision 0 -> F1 0.
    assert compute_tscore(PRED, [], sim, subject_threshold=0.3, item_threshold=0.5).score == 0.0


def test_tscore_embedding_by_hand():
    """Embedding backend: decisions fixed by wide margins, so the score is hand-computable.

    Measured all-MiniLM-L6-v2 cosines: "yellow raincoat" / "wears a yellow coat" 0.79,
    "walks along the sidewalk" / "walking on the sidewalk" 0.90, "a small brown dog" /
    "a woman" 0.11, "brown fur" / "yellow raincoat" 0.39. Lexically the first pair is only 0.4.
    """
    from megatron_vcap.rewards.similarity import build_similarity

    sim = build_similarity("embedding")
    gt = [
        Subject(
            "a young woman in a yellow raincoat",
            ["yellow raincoat", "long black hair"],
            ["walks along the sidewalk"],
        ),
        Subject("a small brown dog", ["brown fur"], ["barks at a car"]),
    ]
    pred = [Subject("a woman", ["wears a yellow coat", "brown fur"], ["walking on the sidewalk"])]
    m = sim.matrix(
        ["yellow raincoat", "walks along the sidewalk"],
        ["wears a yellow coat", "walking on the sidewalk"],
    )
    assert m[0, 0] > 0.7 and m[1, 1] > 0.8 and m[0, 1] < 0.3
    res = compute_tscore(pred, gt, sim, subject_threshold=0.3, item_threshold=0.5)
    # Subject: woman <-> woman. Attributes: "wears a yellow coat" ~ "yellow raincoat" (tp 1);
    # "brown fur" stays a FP (the dog is unmatched; vs the woman's attributes it is < 0.5).
    # Attributes: tp 1, pred 2, gt 3 -> 2/5. Actions: tp 1, pred 1, gt 2 -> 2/3.
    assert res.subject_pairs == [(0, 0)]
    assert res.attribute_f1 == pytest.approx(0.4)
    assert res.action_f1 == pytest.approx(2 / 3)
    assert res.score == pytest.approx((0.4 + 2 / 3) / 2)
    # The lexical backend misses the paraphrased attribute: {wear, yellow, coat} vs
    # {yellow, raincoat} = 2/5 < 0.5, so attribute tp 0.
    lex = compute_tscore(pred, gt, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.5)
    assert lex.attribute_f1 == 0.0 and lex.action_f1 == pytest.approx(2 / 3)
