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
            "<think>Subject 1: a dog\nAttributes: x\nActions: y\nLet me think.</think><answer>c</answer>",
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
            "<think>Subject 1: a dog\nSubject 2: a cat\nAttributes: y\nActions: z</think><answer>c</answer>",
            "incomplete_subject",
            "c",
        ),
        (
            "<think>Subject 1: a dog\nAttributes: x\nSubject 2: a cat</think><answer>c</answer>",
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


# ---------------------------------------------------------------- issue 14, item 8: tolerance
def test_free_text_before_the_first_subject_is_ignored():
    text = (
        "<think>\nLet me look at the video carefully.\nI see a dog.\n"
        "Subject 1: a dog\nAttributes: brown\nActions: runs\n</think>\n<answer>c</answer>"
    )
    parsed = parse_response(text)
    assert parsed.failure is None
    assert parsed.subjects == [Subject("a dog", ["brown"], ["runs"])]
    # A field line in the preamble is still a structural error, not preamble.
    bad = "<think>Actions: runs\nSubject 1: a dog\nAttributes: x</think><answer>c</answer>"
    assert parse_response(bad).failure == "field_outside_subject"


def test_full_width_colon_and_semicolon():
    text = (
        "<think>\nSubject 1：一只小狗\nAttributes：棕色的毛；蓝色项圈\nActions： 在草地上奔跑\n</think>"
        "<answer>一只小狗在草地上奔跑。</answer>"
    )
    parsed = parse_response(text)
    assert parsed.failure is None
    assert parsed.subjects == [Subject("一只小狗", ["棕色的毛", "蓝色项圈"], ["在草地上奔跑"])]


def test_a_subject_needs_one_field_not_both():
    # Missing Attributes (or Actions) means an empty list; the format still holds.
    text = (
        "<think>Subject 1: a dog\nActions: runs\nSubject 2: a lamp\nAttributes: red</think>"
        "<answer>c</answer>"
    )
    parsed = parse_response(text)
    assert parsed.failure is None
    assert parsed.subjects == [Subject("a dog", [], ["runs"]), Subject("a lamp", ["red"], [])]


# ---------------------------------------------------------------- issue 14, item 1: linear time
_HEAD = "<think>\nSubject 1: a dog\nAttributes: brown\nActions: runs\n"
_TAIL = "</think>\n<answer>A dog runs.</answer>"
N = 100_000
ADVERSARIAL = {
    "lt_space": (_HEAD + "<" + " " * N + "x\n" + _TAIL, "unexpected_line"),
    "lt_space_slash": (_HEAD + "<" + " " * N + "/" + " " * N + "x\n" + _TAIL, "unexpected_line"),
    "subject_space": (_HEAD + "Subject" + " " * N + "x\n" + _TAIL, "unexpected_line"),
    "subject_hash_tabs": (_HEAD + "Subject #" + "\t" * N + "x\n" + _TAIL, "unexpected_line"),
    "attributes_space": (_HEAD + "Attributes" + " " * N + "x\n" + _TAIL, "unexpected_line"),
    "subject_lines": (_HEAD + "".join(f"Subject {i}\n" for i in range(N // 8)) + _TAIL,
                      "unexpected_line"),
    "unclosed_tags": ("<think><answer>" * (N // 15), "multiple_think_blocks"),
    "nested_lt": ("<" * N + "think>", "unclosed_think_block"),
    # Whitespace inside a real tag is tolerated however long it is.
    "spaced_tags": ("<" + " " * N + "think >Subject 1: a\nActions: b</ " + " " * N
                    + "think><answer>c</answer>", None),
}  # fmt: skip


def test_adversarial_inputs_parse_correctly_in_linear_time():
    """Each 100k+ character shape of issue 14 parses to the right code.

    Run in a child process under a 60 s watchdog: the old backtracking patterns took minutes
    per shape (65 s at 64k characters), the scanner takes milliseconds
    (tools/bench_rewards.py --parse-only measures it). The watchdog is a hang guard, 1000x
    above the target, not a timing assertion.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import json, sys\n"
        "from megatron_vcap.rewards.parser import parse_response\n"
        "cases = json.load(sys.stdin)\n"
        "print(json.dumps({k: parse_response(t).failure for k, (t, _) in cases.items()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(ADVERSARIAL),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {k: want for k, (_, want) in ADVERSARIAL.items()}
