"""JSONL manifests: one training / evaluation sample per line.

Schema (one JSON object per line; blank lines are ignored)::

    {
      "id":       "clip-0001",            # optional; default "<video stem>#<line number>"
      "video":    "videos/clip-0001.mp4", # required; absolute, or relative to the manifest
      "start":    1.5,                    # optional clip start, seconds (>= 0)
      "end":      7.0,                    # optional clip end, seconds (> start)
      "caption":  "A red circle ...",     # required reference caption
      "subjects": [                       # optional ground-truth structure (DESIGN.md §5)
        {"description": "a small red circle",
         "attributes": ["red", "small", "striped"],
         "actions": ["moves to the right", "grows"]}
      ],
      "events":   ["The red circle moves to the right."],  # optional atomic events
      "meta":     {...}                   # optional, free-form, carried through untouched
    }

Any other key is an error (a misspelt ``"subject"`` would otherwise silently drop the
structure). ``parse_manifest`` collects every problem with its line number; ``load_manifest``
raises one :class:`ManifestError` listing them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vcap.structure import Subject

REQUIRED_KEYS = ("video", "caption")
OPTIONAL_KEYS = ("id", "start", "end", "subjects", "events", "meta")


class ManifestError(ValueError):
    """A manifest with malformed lines; the message names ``path:line`` and the field."""


@dataclass
class Sample:
    id: str
    video: str  # absolute path
    caption: str
    start: float | None = None
    end: float | None = None
    subjects: list[Subject] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # 1-based line in the manifest it came from (0: built in code)

    def to_dict(self, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-ready mapping; the video path is made relative to ``base_dir`` when inside it."""
        video = self.video
        if base_dir is not None:
            try:
                video = os.path.relpath(self.video, base_dir)
                if video.startswith(".."):
                    video = self.video
            except ValueError:  # a different drive on Windows
                video = self.video
        out: dict[str, Any] = {"id": self.id, "video": video}
        if self.start is not None:
            out["start"] = self.start
        if self.end is not None:
            out["end"] = self.end
        out["caption"] = self.caption
        out["subjects"] = [s.to_dict() for s in self.subjects]
        out["events"] = list(self.events)
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass
class Problem:
    line: int
    message: str

    def format(self, path: str | os.PathLike) -> str:
        return f"{path}:{self.line}: {self.message}"


def _number(obj: dict, key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"field '{key}': expected a number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"field '{key}': must be >= 0, got {value}")
    return float(value)


def _string_list(obj: dict, key: str) -> list[str]:
    items = obj.get(key, [])
    if not isinstance(items, list):
        raise ValueError(f"field '{key}': expected a list of strings, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"field '{key}[{i}]': expected a non-empty string, got {item!r}")
    return [x.strip() for x in items]


def parse_sample(obj: Any, line: int, base_dir: Path) -> Sample:
    """One decoded JSON line -> Sample; ValueError names the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    allowed = REQUIRED_KEYS + OPTIONAL_KEYS
    for key in obj:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"unknown field '{key}'{extra}")
    for key in REQUIRED_KEYS:
        if key not in obj:
            raise ValueError(f"missing required field '{key}'")
    video = obj["video"]
    if not isinstance(video, str) or not video.strip():
        raise ValueError(f"field 'video': expected a non-empty path string, got {video!r}")
    caption = obj["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"field 'caption': expected a non-empty string, got {caption!r}")
    start, end = _number(obj, "start"), _number(obj, "end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"field 'end': must be > start ({start}), got {end}")
    subjects_raw = obj.get("subjects", [])
    if not isinstance(subjects_raw, list):
        raise ValueError(f"field 'subjects': expected a list, got {type(subjects_raw).__name__}")
    subjects = [Subject.from_dict(s, f"field subjects[{i}]") for i, s in enumerate(subjects_raw)]
    events = _string_list(obj, "events")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"field 'meta': expected an object, got {type(meta).__name__}")
    sample_id = obj.get("id")
    if sample_id is None:
        sample_id = f"{Path(video).stem}#{line}"
    elif not isinstance(sample_id, str) or not sample_id.strip():
        raise ValueError(f"field 'id': expected a non-empty string, got {sample_id!r}")
    path = Path(video).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return Sample(
        id=sample_id.strip(),
        video=os.path.normpath(str(path)),
        caption=caption.strip(),
        start=start,
        end=end,
        subjects=subjects,
        events=events,
        meta=meta,
        line=line,
    )


def parse_manifest(path: str | os.PathLike) -> tuple[list[Sample], list[Problem]]:
    """Every well-formed sample and every problem (line, message); never raises on content."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base_dir = path.resolve().parent
    samples: list[Sample] = []
    problems: list[Problem] = []
    first_line_of: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                problems.append(Problem(line_no, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            try:
                sample = parse_sample(obj, line_no, base_dir)
            except ValueError as exc:
                problems.append(Problem(line_no, str(exc)))
                continue
            if sample.id in first_line_of:
                problems.append(
                    Problem(
                        line_no,
                        f"field 'id': '{sample.id}' repeats line {first_line_of[sample.id]}",
                    )
                )
                continue
            first_line_of[sample.id] = line_no
            samples.append(sample)
    return samples, problems


def load_manifest(path: str | os.PathLike, max_listed: int = 20) -> list[Sample]:
    """Read a manifest; any malformed line raises :class:`ManifestError` naming ``path:line``."""
    samples, problems = parse_manifest(path)
    if problems:
        listed = "\n".join(p.format(path) for p in problems[:max_listed])
        more = len(problems) - max_listed
        tail = f"\n... and {more} more" if more > 0 else ""
        raise ManifestError(f"{len(problems)} bad line(s) in {path}:\n{listed}{tail}")
    if not samples:
        raise ManifestError(f"{path}: the manifest has no samples")
    return samples


def write_manifest(path: str | os.PathLike, samples: list[Sample]) -> Path:
    """Write samples as JSONL; video paths inside the manifest's folder are stored relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = path.resolve().parent
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample.to_dict(base_dir), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
