"""Test kit for the benchmark evaluation tests: fixtures in the official formats and a scripted
judge answering on a real loopback OpenAI-compatible server in the protocols' own formats.

The judge reads our default templates' layout (``Description:`` / ``Events:`` / numbered items,
``Question:``), looks up the verdict the test chose for each item and answers in a style chosen
per item set (plain JSON, a fenced block with trailing commas, a Python dict, a missing outer
brace), so the clean-up rules are exercised on the way.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

GARBAGE = "I am sorry, I cannot help with that."


class ScriptedJudge:
    """``answer(body)`` for FakeOpenAIServer(require_schema=False)."""

    def __init__(
        self, extract=None, verdicts=None, vdc_answers=None, vdc_verdicts=None, style=None,
        default=False,
    ):  # fmt: skip
        self.extract = extract or {}  # description (as sent) -> list of items, or GARBAGE
        self.verdicts = verdicts or {}  # item -> relationship, or GARBAGE
        self.vdc_answers = vdc_answers or {}  # question -> short answer
        # (question, answer given) -> (pred, score) | GARBAGE
        self.vdc_verdicts = vdc_verdicts or {}
        self.style = style or {}  # first item / description -> "fenced" | "python" | "nobrace"
        # default: unknown descriptions give their first words as one item, unknown items are
        # "neutral" (for captions of a random model).
        self.default = default
        self.prompts: Counter = Counter()

    def _format(self, obj: dict, style: str | None) -> str:
        if style == "fenced":  # fence, newlines and trailing commas
            inner = json.dumps(obj, indent=2)
            inner = re.sub(r"(\"|\})\n(\s*)\]", r"\1,\n\2]", inner)
            return f"```json\n{inner}\n```"
        if style == "python":
            return repr(obj)
        if style == "nobrace":
            return json.dumps(obj)[1:-1]
        return json.dumps(obj)

    def __call__(self, body: dict) -> str:
        user = body["messages"][-1]["content"]
        self.prompts[user] += 1
        if user.startswith("Here is a description of a video"):
            question = user.rsplit("Question: ", 1)[1].split("\n", 1)[0]
            return f"  {self.vdc_answers[question]}\n"
        if user.startswith("Question: "):
            question = user.split("\n", 1)[0][len("Question: ") :]
            given = user.split("Given answer: ", 1)[1].split("\n", 1)[0]
            verdict = self.vdc_verdicts[(question, given)]
            if verdict == GARBAGE:
                return GARBAGE
            return f"{{'pred': '{verdict[0]}', 'score': {verdict[1]}}}"
        desc = user.split("Description:\n", 1)[1]
        kind = "objects" if "objects" in user.split("\n", 1)[0] else "events"
        if "\n\nEvents:\n" in desc or "\n\nStatements:\n" in desc:
            desc, listed = re.split(r"\n\n(?:Events|Statements):\n", desc, maxsplit=1)
            items = [re.sub(r"^\d+\. ", "", line) for line in listed.strip().split("\n")]
            if self.default:
                items_verdicts = {i: self.verdicts.get(i, "neutral") for i in items}
                self.verdicts = {**self.verdicts, **items_verdicts}
            if any(self.verdicts[i] == GARBAGE for i in items):
                return GARBAGE
            key = kind[:-1]
            obj = {
                kind: [
                    {key: i, "relationship": self.verdicts[i].capitalize(), "reason": "because"}
                    for i in items
                ]
            }
            return self._format(obj, self.style.get(items[0]))
        if self.default and desc.strip() not in self.extract:
            words = desc.split()[:4]
            return self._format({kind: [" ".join(words)] if words else []}, None)
        answer = self.extract[desc.strip()]
        if answer == GARBAGE:
            return GARBAGE
        return self._format({kind: answer}, self.style.get(desc.strip()))


def dream_line(idx, subset, vid, reference, events, **extra) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": "<video>\nDescribe the video in detail."},
                {"role": "assistant", "content": reference},
            ],
            "dataset": f"DREAM/{subset}",
            "idx": idx,
            "vid": vid,
            "extra_info": {"duration": 3.0, "events": events, "n_events": len(events), **extra},
        }
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def judge_flags(server, out: Path, **extra) -> list[str]:
    flags = ["--judge-url", server.base_url, "--judge-model", "judge-x", "--out", str(out),
             "--judge-backoff", "0", "--judge-retries", "2", "--judge-timeout", "10"]  # fmt: skip
    for k, v in extra.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags
