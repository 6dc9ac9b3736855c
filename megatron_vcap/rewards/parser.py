"""Parser for the structured-thinking response (DESIGN.md §5).

A well-formed response is exactly one ``<think>`` block followed by exactly one ``<answer>``
block, nothing but whitespace around them. The think block lists subjects, each as a
``Subject N: description`` line followed by an ``Attributes:`` and an ``Actions:`` line (items
separated by ``;``, or given as bullet / numbered lines below the header). The parser is tolerant
of whitespace, numbering, case, markdown emphasis and bullet styles, and strict about structure:
any other arrangement yields a short, stable failure code (used as a metric key) instead of a
guess. The caption is extracted whenever the answer block itself is well formed, so a response
with a broken think block can still earn a caption score while its format score is 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_vcap.structure import Subject

# Failure codes, in the order the checks run. Stable: they are metric keys.
FAILURE_CODES = (
    "empty_response",
    "no_think_block",
    "multiple_think_blocks",
    "unclosed_think_block",
    "no_answer_block",
    "multiple_answer_blocks",
    "unclosed_answer_block",
    "answer_before_think",
    "misordered_tags",
    "text_outside_blocks",
    "empty_think",
    "empty_answer",
    "no_subjects",
    "unexpected_line",
    "field_outside_subject",
    "duplicate_field",
    "empty_subject_description",
    "incomplete_subject",
)

_TAG = re.compile(r"<\s*(/?)\s*(think|answer)\s*>", re.IGNORECASE)
# A list marker in front of a line: "-", "*", "•", "1.", "1)", "(1)", "a)" and markdown headers.
_MARKER = re.compile(r"^(?:[-*•·–—+]+|\(?\d{1,3}[.)]|\(?[a-z][.)]|#{1,6})\s+", re.IGNORECASE)
_SUBJECT = re.compile(r"^subject\s*(?:#?\s*\d+)?\s*[:\-–—]\s*(.*)$", re.IGNORECASE)
_FIELD = re.compile(r"^(attributes?|actions?)\s*[:\-–—]\s*(.*)$", re.IGNORECASE)
_EMPTY_ITEMS = {"", "none", "n/a", "na", "-", "nothing", "no attributes", "no actions"}


@dataclass
class ParsedResponse:
    """What the model wrote: its subjects and caption, or why the structure is broken.

    ``failure`` is None for a well-formed response. ``caption`` is set whenever the answer block
    alone is well formed (even if ``failure`` is set); ``subjects`` only when ``failure`` is None.
    """

    subjects: list[Subject] = field(default_factory=list)
    caption: str | None = None
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _strip_marker(line: str) -> tuple[str, bool]:
    """Remove one leading bullet / number marker and markdown emphasis; report if one was there."""
    text = line.strip().replace("**", "").replace("__", "").strip()
    match = _MARKER.match(text)
    if match:
        return text[match.end() :].strip(), True
    return text, False


def _split_items(text: str) -> list[str]:
    """``'a; b; c.'`` -> ``['a', 'b', 'c']``; placeholder items such as 'none' are dropped."""
    items = []
    for raw in text.split(";"):
        item, _ = _strip_marker(raw)
        item = item.strip().rstrip(".").strip()
        if item.lower() not in _EMPTY_ITEMS:
            items.append(item)
    return items


def _find_blocks(text: str) -> tuple[str | None, str | None, str | None, str | None]:
    """Locate the blocks: ``(failure, think_body, answer_body, caption)``.

    ``caption`` is reported whenever exactly one well-ordered answer block exists.
    """
    tags = [(m, m.group(2).lower(), bool(m.group(1))) for m in _TAG.finditer(text)]
    opens = {
        n: [m for m, name, close in tags if name == n and not close] for n in ("think", "answer")
    }
    closes = {n: [m for m, name, close in tags if name == n and close] for n in ("think", "answer")}

    caption = None
    a_open, a_close = opens["answer"], closes["answer"]
    if len(a_open) == 1 and len(a_close) == 1 and a_open[0].end() <= a_close[0].start():
        caption = text[a_open[0].end() : a_close[0].start()].strip() or None

    for name in ("think", "answer"):
        n_open, n_close = len(opens[name]), len(closes[name])
        if n_open == 0 and n_close == 0:
            return f"no_{name}_block", None, None, caption
        if n_open > 1 or n_close > 1:
            return f"multiple_{name}_blocks", None, None, caption
        if n_open != n_close:
            return f"unclosed_{name}_block", None, None, caption

    t_open, t_close = opens["think"][0], closes["think"][0]
    a_open, a_close = opens["answer"][0], closes["answer"][0]
    if a_close.start() < t_open.start():
        return "answer_before_think", None, None, caption
    if not (t_open.start() < t_close.start() < a_open.start() < a_close.start()):
        return "misordered_tags", None, None, caption
    outside = text[: t_open.start()] + text[t_close.end() : a_open.start()] + text[a_close.end() :]
    if outside.strip():
        return "text_outside_blocks", None, None, caption
    think = text[t_open.end() : t_close.start()]
    answer = text[a_open.end() : a_close.start()]
    return None, think, answer, caption


def _parse_think(body: str) -> tuple[list[Subject], str | None]:
    """The think block's subjects, or a failure code. Lines are read by a small state machine."""
    lines = [_strip_marker(line) for line in body.splitlines()]
    if not any(_SUBJECT.match(text) for text, _ in lines):
        return [], "no_subjects"

    subjects: list[Subject] = []
    current: dict | None = None  # {"description", "attributes", "actions"} of the open subject
    open_field: str | None = None  # field that accepts continuation lines
    plain_ok = False  # plain (unbulleted) continuation lines allowed: header had no inline items

    def close_subject() -> str | None:
        if current is None:
            return None
        if current["attributes"] is None or current["actions"] is None:
            return "incomplete_subject"
        subjects.append(Subject(current["description"], current["attributes"], current["actions"]))
        return None

    for text, bulleted in lines:
        if not text:
            continue
        subject_match = _SUBJECT.match(text)
        field_match = _FIELD.match(text)
        if subject_match:
            failure = close_subject()
            if failure:
                return [], failure
            description = subject_match.group(1).strip().rstrip(".").strip()
            if not description:
                return [], "empty_subject_description"
            current = {"description": description, "attributes": None, "actions": None}
            open_field, plain_ok = None, False
        elif field_match:
            if current is None:
                return [], "field_outside_subject"
            name = "attributes" if field_match.group(1).lower().startswith("attr") else "actions"
            if current[name] is not None:
                return [], "duplicate_field"
            current[name] = _split_items(field_match.group(2))
            open_field, plain_ok = name, not field_match.group(2).strip()
        elif open_field is not None and (bulleted or plain_ok):
            current[open_field].extend(_split_items(text))
        else:
            return [], "unexpected_line"
    failure = close_subject()
    return (subjects, None) if failure is None else ([], failure)


def parse_response(text: str) -> ParsedResponse:
    """Parse one model response into subjects and caption, or a failure code (see module doc)."""
    if not text or not text.strip():
        return ParsedResponse(failure="empty_response")
    failure, think, answer, caption = _find_blocks(text)
    if failure is not None:
        return ParsedResponse(caption=caption, failure=failure)
    if not think.strip():
        return ParsedResponse(caption=caption, failure="empty_think")
    if not answer.strip():
        return ParsedResponse(caption=None, failure="empty_answer")
    subjects, failure = _parse_think(think)
    return ParsedResponse(subjects=subjects, caption=caption, failure=failure)
