"""Judge prompts, their JSON schemas and the validators every answer goes through.

Written for this project after the DREAM-1K AutoDQ protocol: a caption is reduced to at most N
atomic events (each one subject and one action, pronouns resolved, no camera moves or scene
cuts), and each event gets an entailment / neutral / contradiction verdict against a caption.
Every task asks for structured output (``response_format`` of type ``json_schema``), and every
answer is validated here anyway: servers that ignore the schema answer in free form.

The variable part of a prompt is a JSON object after an ``Input:`` line, which models read well
and which keeps the prompt unambiguous whatever the captions contain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_vcap.rewards.caption import VERDICTS
from megatron_vcap.structure import Subject

INPUT_MARKER = "Input:\n"


class InvalidAnswer(ValueError):
    """A judge answer that parsed as JSON but does not satisfy the task's contract."""


@dataclass(frozen=True)
class JudgeTask:
    """One chat-completion request: messages, the JSON schema asked for, and the validator.

    ``schema=None`` sends no ``response_format`` (judges such as GPT-3.5 accept no JSON schema;
    the benchmark protocols ask in free form). ``decode`` turns the answer text into the value
    ``parse`` validates; by default the first JSON object in the text (``decode_json_answer``).
    Either raises ``InvalidAnswer`` (or ``json.JSONDecodeError``) on an unusable answer, which
    the client retries.
    """

    name: str
    messages: tuple[dict[str, str], ...]
    schema: dict[str, Any] | None
    parse: Callable[[Any], Any]
    decode: Callable[[str], Any] | None = None

    def decode_text(self, text: str) -> Any:
        return decode_json_answer(text) if self.decode is None else self.decode(text)

    def response_format(self) -> dict[str, Any] | None:
        if self.schema is None:
            return None
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.schema, "strict": True},
        }


_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_MAX_OBJECT_STARTS = 32  # "{" characters tried before giving up on a chatty answer


def decode_json_answer(text: str) -> Any:
    """The answer's JSON object, also when fenced (```json ... ```) or wrapped in prose.

    A server that ignores ``response_format`` answers like a chat model; at temperature 0 a
    retry repeats the same answer, so rejecting the wrapper would fail every sample (issue 14,
    item 6). Plain JSON parses as is; otherwise the inside of the first fence, then the first
    ``{`` that starts a complete JSON value, is taken and anything after it ignored. Raises
    ``json.JSONDecodeError`` (retried, counted as ``malformed_json``) when there is none.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as first_error:
        error = first_error
    candidates = [m.group(1) for m in _FENCE.finditer(text)][:1] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        start = candidate.find("{")
        for _ in range(_MAX_OBJECT_STARTS):
            if start < 0:
                break
            try:
                return decoder.raw_decode(candidate, start)[0]
            except json.JSONDecodeError:
                start = candidate.find("{", start + 1)
    raise error


def _messages(system: str, payload: dict[str, Any]) -> tuple[dict[str, str], ...]:
    user = INPUT_MARKER + json.dumps(payload, ensure_ascii=False, indent=1)
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def read_payload(messages: list[dict[str, str]]) -> dict[str, Any]:
    """The JSON payload of a task's user message (the inverse of how prompts are built)."""
    content = messages[-1]["content"]
    return json.loads(content.split(INPUT_MARKER, 1)[1])


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def _require_keys(obj: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidAnswer(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InvalidAnswer(f"{where}: missing key(s) {missing}")
    return obj


# ---------------------------------------------------------------- event extraction
EXTRACT_SYSTEM = """You turn a video description into a list of atomic events.
Rules:
- At most {max_events} events, in the order they happen.
- Each event is one short sentence with an explicit subject and exactly one action, e.g.
  "The woman opens a red umbrella." Split compound actions into separate events.
- Resolve pronouns: name the subject ("the dog"), never "he", "she", "it" or "they".
- Leave out camera movements, shot changes and scene cuts, and static descriptions of
  appearance or setting that involve no action.
- Use only what the description states; add nothing.
Answer only with JSON: {{"events": ["...", "..."]}}."""


def build_extract_events_task(caption: str, max_events: int) -> JudgeTask:
    schema = _obj(
        {"events": {"type": "array", "items": {"type": "string"}, "maxItems": max_events}}
    )

    def parse(obj: Any) -> list[str]:
        events = _require_keys(obj, ("events",), "events answer")["events"]
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise InvalidAnswer("events: expected a list of strings")
        events = [e.strip() for e in events if e.strip()]
        if len(events) > max_events:
            raise InvalidAnswer(f"events: {len(events)} events, at most {max_events} allowed")
        return events

    system = EXTRACT_SYSTEM.format(max_events=max_events)
    return JudgeTask("event_extraction", _messages(system, {"description": caption}), schema, parse)


# ---------------------------------------------------------------- entailment
ENTAIL_SYSTEM = """You check which events a video description supports.
For every event, compare it with the description and give one verdict:
- "entailment": the description states or clearly implies this event (same subject doing the
  same action; wording may differ).
- "contradiction": the description states something incompatible with the event (another
  subject, another action, or conflicting details).
- "neutral": the description does not mention the event or is too vague to decide.
Judge each event on its own, using only the description. Return exactly one verdict per event,
with the event's index, in order.
Answer only with JSON: {"verdicts": [{"index": 0, "verdict": "entailment"}, ...]}."""


def build_entailment_task(premise: str, events: list[str]) -> JudgeTask:
    schema = _obj(
        {
            "verdicts": {
                "type": "array",
                "items": _obj(
                    {
                        "index": {"type": "integer"},
                        "verdict": {"type": "string", "enum": list(VERDICTS)},
                    }
                ),
                "minItems": len(events),
                "maxItems": len(events),
            }
        }
    )

    def parse(obj: Any) -> list[str]:
        items = _require_keys(obj, ("verdicts",), "verdicts answer")["verdicts"]
        if not isinstance(items, list) or len(items) != len(events):
            got = len(items) if isinstance(items, list) else type(items).__name__
            raise InvalidAnswer(f"verdicts: expected {len(events)} entries, got {got}")
        out: list[str | None] = [None] * len(events)
        for pos, item in enumerate(items):
            item = _require_keys(item, ("index", "verdict"), f"verdicts[{pos}]")
            index, verdict = item["index"], item["verdict"]
            if isinstance(index, bool) or not isinstance(index, int):
                raise InvalidAnswer(f"verdicts[{pos}].index: expected an integer")
            if not 0 <= index < len(events) or out[index] is not None:
                raise InvalidAnswer(f"verdicts[{pos}].index: {index} out of range or repeated")
            verdict = verdict.strip().lower() if isinstance(verdict, str) else verdict
            if verdict not in VERDICTS:
                raise InvalidAnswer(f"verdicts[{pos}].verdict: {verdict!r} not in {VERDICTS}")
            out[index] = verdict
        return out  # every slot filled: len matches and indices are distinct and in range

    payload = {"description": premise, "events": list(events)}
    return JudgeTask("event_entailment", _messages(ENTAIL_SYSTEM, payload), schema, parse)


# ---------------------------------------------------------------- CNscore rating
RATE_SYSTEM = """You grade a candidate video caption against a reference description.
Give two integer scores from 0 to 10:
- "coverage": how much of the reference content (subjects, their attributes, their actions and
  the order of events) the candidate conveys correctly; details that contradict the reference
  count against it.
- "naturalness": how fluent and natural the candidate reads as English prose; penalise
  repetition, list-like fragments and broken sentences.
Answer only with JSON: {"coverage": <0-10>, "naturalness": <0-10>}."""


def _rating(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InvalidAnswer(f"{where}: expected an integer, got {value!r}")
    if not 0 <= value <= 10:
        raise InvalidAnswer(f"{where}: {value} outside [0, 10]")
    return int(value)


def build_rating_task(reference: str, caption: str) -> JudgeTask:
    score = {"type": "integer", "minimum": 0, "maximum": 10}
    schema = _obj({"coverage": score, "naturalness": score})

    def parse(obj: Any) -> tuple[int, int]:
        obj = _require_keys(obj, ("coverage", "naturalness"), "rating answer")
        return _rating(obj["coverage"], "coverage"), _rating(obj["naturalness"], "naturalness")

    payload = {"reference": reference, "candidate": caption}
    return JudgeTask("caption_rating", _messages(RATE_SYSTEM, payload), schema, parse)


# ---------------------------------------------------------------- structure (dataset tool)
STRUCTURE_SYSTEM = """You extract the structure of a video from its description.
List the subjects (people, animals or objects that act or are prominent). For each give:
- "description": a short noun phrase that identifies it (e.g. "a young woman in a raincoat");
- "attributes": short phrases about its appearance, clothing, colour or state;
- "actions": short verb phrases for what it does, in order.
Use only what the description states; add nothing. Every subject must have a description.
Answer only with JSON: {"subjects": [{"description": "...", "attributes": ["..."],
"actions": ["..."]}]}."""


def build_structure_task(caption: str) -> JudgeTask:
    strings = {"type": "array", "items": {"type": "string"}}
    subject = _obj({"description": {"type": "string"}, "attributes": strings, "actions": strings})
    schema = _obj({"subjects": {"type": "array", "items": subject, "minItems": 1}})

    def parse(obj: Any) -> list[Subject]:
        items = _require_keys(obj, ("subjects",), "structure answer")["subjects"]
        if not isinstance(items, list) or not items:
            raise InvalidAnswer("subjects: expected a non-empty list")
        try:
            return [Subject.from_dict(s, f"subjects[{i}]") for i, s in enumerate(items)]
        except ValueError as exc:
            raise InvalidAnswer(str(exc)) from None

    return JudgeTask(
        "video_structure", _messages(STRUCTURE_SYSTEM, {"description": caption}), schema, parse
    )
