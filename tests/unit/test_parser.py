"""Structured-output parser: hand-written responses, tolerated variants and every failure code."""

from __future__ import annotations

import pytest

from megatron_vcap.rewards.parser import FAILURE_CODES, parse_response
from megatron_vcap.structure import Subject, render_response

WOMAN = Subject(
    "a young woman in a yellow raincoat",
    ["long black hair", "yellow raincoat", "holds a red umbrella"],
    ["walks along the sidewalk", "opens the umbrella", "looks up at the sky"],
)
DOG = Subject("a small brown dog", ["brown fur", "blue collar"], ["runs beside the woman"])
CAPTION = "A young woman with long black hair walks along the sidewalk."


def test_reads_back_the_rendered_template():
    parsed = parse_response(render_response([WOMAN, DOG], CAPTION))
    assert parsed.ok and parsed.failure is None
    assert parsed.subjects == [WOMAN, DOG]
    assert parsed.caption == CAPTION


def test_tolerates_case_numbering_bullets_whitespace_and_markdown():
    text = """

  <THINK>
  **SUBJECT #1** - a young woman in a yellow raincoat
     attributes:
       - long black hair
       * yellow raincoat
       • holds a red umbrella.
  Action:   1. walks along the sidewalk ;2) opens the umbrella;  looks up at the sky

- subject 7: a small brown dog
Attributes: brown fur; blue collar
ACTIONS:
runs beside the woman
</think>
   <Answer>  A young woman with long black hair walks along the sidewalk.
</answer>  \n"""
    parsed = parse_response(text)
    assert parsed.failure is None
    assert parsed.subjects == [WOMAN, DOG]
    assert parsed.caption == CAPTION


def test_placeholder_items_mean_empty_lists():
    text = (
        "<think>\nSubject 1: a lamp\nAttributes: none\nActions: N/A\n</think>\n<answer>x</answer>"
    )
    parsed = parse_response(text)
    assert parsed.failure is None
    assert parsed.subjects == [Subject("a lamp", [], [])]


GOOD_THINK = "<think>\nSubject 1: a dog\nAttributes: brown\nActions: runs\n</think>"


@pytest.mark.parametrize(
    "text, code, caption",
    [
        ("", "empty_response", None),
        ("   \n ", "empty_response", None),
        ("<answer>a dog runs</answer>", "no_think_block", "a dog runs"),
        (GOOD_THINK + GOOD_THINK + "<answer>c</answer>", "multiple_think_blocks", "c"),
        (
            "<think>Subject 1: a dog\nAttributes: x\nActions: y\n<answer>c</answer>",
            "unclosed_think_block",
            "c",
        ),
        (GOOD_THINK + "\nA dog runs.", "no_answer_block", None),
        (GOOD_THINK + "<answer>a</answer><answer>b</answer>", "multiple_answer_blocks", None),
        (GOOD_THINK + "<answer>a dog runs", "unclosed_answer_block", None),
        ("<answer>c</answer>" + GOOD_THINK, "answer_before_think", "c"),
        ("<think>Subject 1: a dog\n<answer>c</answer></think>", "misordered_tags", "c"),
        ("Sure! " + GOOD_THINK + "<answer>c</answer>", "text_outside_blocks", "c"),
        (GOOD_THINK + " so <answer>c</answer>", "text_outside_blocks", "c"),
        (GOOD_THINK + "<answer>c</answer> done", "text_outside_blocks", "c"),
        ("<think>  \n </think><answer>c</answer>", "empty_think", "c"),
        (GOOD_THINK + "<answer> \n </answer>", "empty_answer", None),
        ("<think>A dog runs in a park.</think><answer>c</answer>", "no_subjects", "c"),
        (
            "<think>Let me think.\nSubject 1: a dog\nAttributes: x\nActions: y</think><answer>c</answer>",
            "unexpected_line",
            "c",
        ),
        (
            "<think>Subject 1: a dog\nAttributes: x\nActions: y\nThe end.</think><answer>c</answer>",
            "unexpected_line",
            "c",
        ),
        (
            "<think>Attributes: x\nSubject 1: a dog\nAttributes: x\nActions: y</think><answer>c</answer>",
            "field_outside_subject",
            "c",
        ),
        (
            "<think>Subject 1: a dog\nAttributes: x\nAttributes: z\nActions: y</think><answer>c</answer>",
            "duplicate_field",
            "c",
        ),
        (
            "<think>Subject 1:\nAttributes: x\nActions: y</think><answer>c</answer>",
            "empty_subject_description",
            "c",
        ),
        (
            "<think>Subject 1: a dog\nAttributes: x\nSubject 2: a cat\nAttributes: y\nActions: z</think><answer>c</answer>",
            "incomplete_subject",
            "c",
        ),
        (
            "<think>Subject 1: a dog\nActions: y</think><answer>c</answer>",
            "incomplete_subject",
            "c",
        ),
    ],
)
def test_failure_codes(text, code, caption):
    parsed = parse_response(text)
    assert parsed.failure == code
    assert code in FAILURE_CODES
    assert parsed.subjects == []
    assert parsed.caption == caption


def test_every_failure_code_is_exercised():
    # Keeps FAILURE_CODES honest: the parametrised cases above cover each one.
    params = test_failure_codes.pytestmark[0].args[1]
    covered = {p[1] for p in params}
    assert covered == set(FAILURE_CODES)
