"""Parser for the structured-thinking response (DESIGN.md §5).

A well-formed response is exactly one ``<think>`` block followed by exactly one ``<answer>``
block, nothing but whitespace around them. The think block lists subjects, each as a
``Subject N: description`` line followed by an ``Attributes:`` and an ``Actions:`` line (items
separated by ``;``, or given as bullet / numbered lines below the header). The parser is tolerant
of whitespace, numbering, case, markdown emphasis and bullet styles, and strict about structure:
any other arrangement yields a short, stable failure code (used as a metric key) instead of a
guess. The caption is extracted whenever the answer block itself is well formed, so a response
with a broken think block can still earn a caption score while its format score is 0.

Cost is linear in the response length: subject and field headers are read by hand-written
matchers and tags by a pattern whose every match path is unique, never by a backtracking one (a policy can emit ``<`` or ``Subject`` followed by
100k spaces; the old patterns took 65 s on 64k characters, issue 14).

Tolerance decisions (issue 14, item 8: tolerant wherever the structure stays unambiguous):

* Free-text lines before the first ``Subject`` header inside the think block ("Let me look at
  the video.") are ignored: nothing else can own them. A field line there is still
  ``field_outside_subject``, and free text *after* a subject's items stays ``unexpected_line``
  (it could be a mis-bulleted item: guessing would change the items).
* A full-width colon (``：``, U+FF1A) separates a header from its text like ``:``; a full-width
  semicolon (``；``) separates items like ``;`` (models that write Chinese switch to them).
* A subject needs a description and at least one of its two fields; a missing ``Attributes`` or
  ``Actions`` line means an empty list (Tscore then counts the ground truth's items as missed,
  so omitting a field never pays). A subject with neither field is ``incomplete_subject``: a
  bare header line is not a parseable subject (DESIGN.md §6 asks for at least one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

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

# A list marker in front of a line: "-", "*", "•", "1.", "1)", "(1)", "a)" and markdown headers.
# Linear: one greedy run, then whitespace, anchored at the line start.
_MARKER = re.compile(r"^(?:[-*•·–—+]+|\(?\d{1,3}[.)]|\(?[a-z][.)]|#{1,6})\s+", re.IGNORECASE)
_WS = re.compile(r"\s*")  # used only as a cursor: match(text, pos).end() skips a run once
# Every way through the tag pattern is unique: an attempt at one "<" costs the length of the run
# after it and no more. The old ``<\s*(/?)\s*`` tried every split of a whitespace run between
# its two stars (quadratic); ``(?:/\s*)?`` can only start at a "/".
_TAG = re.compile(r"<\s*(?:(/)\s*)?(think|answer)\s*>", re.IGNORECASE)
_SEPARATORS = ":-–—："  # between a header word and its text; "：" is the full-width colon
_ITEM_SPLIT = re.compile("[;；]")
_TAG_NAMES = ("think", "answer")
_FIELD_WORDS = (("attributes", "attributes"), ("attribute", "attributes"),
                ("actions", "actions"), ("action", "actions"))  # fmt: skip
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
    for raw in _ITEM_SPLIT.split(text):
        item, _ = _strip_marker(raw)
        item = item.strip().rstrip(".").strip()
        if item.lower() not in _EMPTY_ITEMS:
            items.append(item)
    return items


class _Span(NamedTuple):
    start: int
    end: int


def _header_text(text: str, pos: int) -> str | None:
    """The text after a header's separator at ``pos`` (whitespace around it skipped), or None."""
    pos = _WS.match(text, pos).end()
    if pos >= len(text) or text[pos] not in _SEPARATORS:
        return None
    return text[pos + 1 :].strip()


def _match_subject(text: str) -> str | None:
    """``'Subject #2: a dog'`` -> ``'a dog'``; None when the line is not a subject header."""
    if text[:7].lower() != "subject":
        return None
    pos = _WS.match(text, 7).end()
    number = pos + 1 if pos < len(text) and text[pos] == "#" else pos
    number = _WS.match(text, number).end()
    end = number
    while end < len(text) and text[end].isdigit():
        end += 1
    # "Subject #" without a number leaves the "#" to fail the separator test, as before.
    return _header_text(text, end if end > number else pos)


def _match_field(text: str) -> tuple[str, str] | None:
    """``'Actions: runs; barks'`` -> ``('actions', 'runs; barks')``; None for other lines."""
    head = text[:10].lower()
    for word, name in _FIELD_WORDS:
        if head.startswith(word):
            rest = _header_text(text, len(word))
            return None if rest is None else (name, rest)
    return None


def _find_blocks(text: str) -> tuple[str | None, str | None, str | None, str | None]:
    """Locate the blocks: ``(failure, think_body, answer_body, caption)``.

    ``caption`` is reported whenever exactly one well-ordered answer block exists.
    """
    opens: dict[str, list[_Span]] = {n: [] for n in _TAG_NAMES}
    closes: dict[str, list[_Span]] = {n: [] for n in _TAG_NAMES}
    for m in _TAG.finditer(text):
        (closes if m.group(1) else opens)[m.group(2).lower()].append(_Span(m.start(), m.end()))

    caption = None
    a_open, a_close = opens["answer"], closes["answer"]
    if len(a_open) == 1 and len(a_close) == 1 and a_open[0].end <= a_close[0].start:
        caption = text[a_open[0].end : a_close[0].start].strip() or None

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
    if a_close.start < t_open.start:
        return "answer_before_think", None, None, caption
    if not (t_open.start < t_close.start < a_open.start < a_close.start):
        return "misordered_tags", None, None, caption
    outside = text[: t_open.start] + text[t_close.end : a_open.start] + text[a_close.end :]
    if outside.strip():
        return "text_outside_blocks", None, None, caption
    think = text[t_open.end : t_close.start]
    answer = text[a_open.end : a_close.start]
    return None, think, answer, caption


def _parse_think(body: str) -> tuple[list[Subject], str | None]:
    """The think block's subjects, or a failure code. Lines are read by a small state machine."""
    lines = [_strip_marker(line) for line in body.splitlines()]
    if not any(_match_subject(text) is not None for text, _ in lines):
        return [], "no_subjects"

    subjects: list[Subject] = []
    current: dict | None = None  # {"description", "attributes", "actions"} of the open subject
    open_field: str | None = None  # field that accepts continuation lines
    plain_ok = False  # plain (unbulleted) continuation lines allowed: header had no inline items

    def close_subject() -> str | None:
        if current is None:
            return None
        if current["attributes"] is None and current["actions"] is None:
            return "incomplete_subject"
        attributes, actions = current["attributes"] or [], current["actions"] or []
        subjects.append(Subject(current["description"], attributes, actions))
        return None

    for text, bulleted in lines:
        if not text:
            continue
        description = _match_subject(text)
        field_match = _match_field(text) if description is None else None
        if description is not None:
            failure = close_subject()
            if failure:
                return [], failure
            description = description.rstrip(".").strip()
            if not description:
                return [], "empty_subject_description"
            current = {"description": description, "attributes": None, "actions": None}
            open_field, plain_ok = None, False
        elif field_match is not None:
            if current is None:
                return [], "field_outside_subject"
            name, items = field_match
            if current[name] is not None:
                return [], "duplicate_field"
            current[name] = _split_items(items)
            open_field, plain_ok = name, not items
        elif open_field is not None and (bulleted or plain_ok):
            current[open_field].extend(_split_items(text))
        elif current is None:
            continue  # preamble before the first subject: ignored (see the module docstring)
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
