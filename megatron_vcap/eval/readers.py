"""Readers for the benchmarks' released files and for captions made elsewhere.

* DREAM-1K ``DREAM-1k.jsonl``: one JSON object per line with ``messages`` (the user turn holds the
  instruction, the assistant turn the human reference), ``dataset`` = ``DREAM/<subset>``, ``idx``,
  ``vid`` and ``extra_info.events`` (plus ``n_subjects``, ``n_shots``, ``n_events``).
* CAREBENCH: a JSON list of ``{video, caption, events?, objects?, category?}``.
* VDC: one QA file per caption type, each line ``{video_id: [{question, answer, category}]}``.
* ``--predictions``: one JSON object per line, ``{"id", "caption"}`` (VDC adds ``"type"``).

Every problem is reported with the file, the line (or list index) and the field. Video paths are
resolved against ``--videos DIR``; :func:`check_videos` lists the missing ones and either drops
them (counted) or stops, by flag.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vcap.config.loader import ConfigError

log = logging.getLogger(__name__)

DREAM_SUBSETS = ("movie_live_action", "movie_animation", "videvo", "youtube", "vertical_video")
VDC_TYPES = ("camera", "short", "background", "main_object", "detailed")
DEFAULT_INSTRUCTION = "Describe the video in detail."
_VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class EvalDataError(ConfigError):
    """A benchmark file, prediction file or video folder that cannot be used as given."""


@dataclass
class EvalSample:
    """One captioning job of a benchmark (VDC: one video for one caption type)."""

    id: str  # DREAM idx, CAREBENCH video, VDC video_id (as a string)
    video: str  # the name in the annotation (resolved against --videos later)
    instruction: str
    reference: str = ""
    gt_items: dict[str, list[str] | None] = field(default_factory=dict)  # events / objects
    group: str = ""  # DREAM subset, CAREBENCH category ("" when absent)
    meta: dict[str, Any] = field(default_factory=dict)  # DREAM n_subjects / n_shots / n_events
    vtype: str = ""  # VDC caption type
    qa: list[dict[str, str]] = field(default_factory=list)  # VDC question / answer / category
    video_path: str = ""  # set by check_videos

    @property
    def key(self) -> str:
        """Unique within a benchmark run (VDC captions are per type)."""
        return f"{self.vtype}/{self.id}" if self.vtype else self.id


def _err(path, where, field_name: str, msg: str) -> EvalDataError:
    return EvalDataError(f"{path}:{where}: field '{field_name}': {msg}")


def _str_list(obj: dict, key: str, path, where) -> list[str] | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(path, where, key, "expected a list of strings")
    return [v.strip() for v in value if v.strip()]


def _json_lines(path: Path):
    """(line number, object) for each non-blank line; a bad line names its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvalDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{path}:{number}: expected a JSON object per line")
        yield number, obj


# ------------------------------------------------------------------------------ DREAM-1K
def _dream_messages(obj: dict, path, n) -> tuple[str, str]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _err(path, n, "messages", "expected a non-empty list")
    instruction, reference = None, None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise _err(path, n, f"messages[{i}]", "expected an object with 'role'")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "video", ...}, {"type": "text", "text": ...}]
            content = " ".join(
                c.get("text", "") for c in content if isinstance(c, dict) and "text" in c
            )
        if not isinstance(content, str):
            raise _err(path, n, f"messages[{i}].content", "expected text")
        if m["role"] == "user" and instruction is None:
            instruction = content.replace("<video>", "").strip()
        elif m["role"] == "assistant":
            reference = content.strip()
    if not reference:
        raise _err(path, n, "messages", "no assistant turn with the reference description")
    return instruction or DEFAULT_INSTRUCTION, reference


def read_dream1k(path: str | os.PathLike) -> list[EvalSample]:
    path = Path(path)
    samples, seen = [], {}
    for n, obj in _json_lines(path):
        instruction, reference = _dream_messages(obj, path, n)
        if "idx" not in obj or isinstance(obj["idx"], bool):
            raise _err(path, n, "idx", "missing")
        sid = str(obj["idx"])
        if sid in seen:
            raise _err(path, n, "idx", f"{sid} repeats line {seen[sid]}")
        seen[sid] = n
        dataset = obj.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise _err(path, n, "dataset", "expected 'DREAM/<subset>'")
        subset = dataset.split("/", 1)[-1]
        vid = obj.get("video_file") or obj.get("vid")
        if not isinstance(vid, str) or not vid:
            raise _err(path, n, "vid", "missing video name")
        extra = obj.get("extra_info")
        if not isinstance(extra, dict):
            raise _err(path, n, "extra_info", "expected an object")
        events = _str_list(extra, "events", path, n)
        if events is None:
            raise _err(path, n, "extra_info.events", "missing")
        meta = {}
        for key in ("n_subjects", "n_shots", "n_events"):
            value = extra.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise _err(path, n, f"extra_info.{key}", f"expected an integer, got {value!r}")
            meta[key] = value
        if meta["n_events"] is None:
            meta["n_events"] = len(events)
        samples.append(
            EvalSample(sid, vid, instruction, reference, {"events": events}, subset, meta)
        )
    if not samples:
        raise EvalDataError(f"{path}: no samples")
    return samples


# ------------------------------------------------------------------------------ CAREBENCH
def read_carebench(path: str | os.PathLike) -> list[EvalSample]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a JSON list of samples")
    samples, seen = [], {}
    for i, obj in enumerate(data):
        where = f"[{i}]"
        if not isinstance(obj, dict):
            raise EvalDataError(f"{path}:{where}: expected an object")
        video = obj.get("video")
        if not isinstance(video, str) or not video:
            raise _err(path, where, "video", "missing")
        if video in seen:
            raise _err(path, where, "video", f"{video} repeats entry [{seen[video]}]")
        seen[video] = i
        caption = obj.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise _err(path, where, "caption", "missing reference caption")
        category = obj.get("category", "")
        if not isinstance(category, str):
            raise _err(path, where, "category", "expected a string")
        items = {k: _str_list(obj, k, path, where) for k in ("events", "objects")}
        samples.append(
            EvalSample(video, video, DEFAULT_INSTRUCTION, caption.strip(), items, category)
        )
    if not samples:
        raise EvalDataError(f"{path}: no samples")
    return samples


# ------------------------------------------------------------------------------ VDC
def find_vdc_file(qa_dir: Path, vtype: str) -> Path:
    """The QA file of a caption type: ``<type>.jsonl`` or any ``*<type>*.jsonl`` (one match)."""
    exact = qa_dir / f"{vtype}.jsonl"
    if exact.is_file():
        return exact
    matches = sorted(p for p in qa_dir.glob(f"*{vtype}*.jsonl") if p.is_file())
    if vtype == "short":  # "short" must not pick up e.g. a file named after another type
        matches = [p for p in matches if "detailed" not in p.name]
    if len(matches) != 1:
        found = ", ".join(p.name for p in matches) or "none"
        raise EvalDataError(
            f"--qa-dir {qa_dir}: need one QA file for type '{vtype}', found {found}"
        )
    return matches[0]


def read_vdc(
    qa_dir: str | os.PathLike, types: list[str], pools: dict[str, list[str]]
) -> list[EvalSample]:
    """One sample per (type, video); the instruction is drawn from the type's pool (seed 0)."""
    import random

    qa_dir = Path(qa_dir)
    if not qa_dir.is_dir():
        raise EvalDataError(f"--qa-dir {qa_dir}: not a directory")
    samples = []
    for vtype in types:
        path = find_vdc_file(qa_dir, vtype)
        rng = random.Random(0)  # one draw per sample in file order, as the official script does
        pool = pools[vtype]
        seen: dict[str, int] = {}
        for n, obj in _json_lines(path):
            for vid, qas in obj.items():
                if vid in seen:
                    raise _err(path, n, vid, f"video repeats line {seen[vid]}")
                seen[vid] = n
                if not isinstance(qas, list) or not qas:
                    raise _err(path, n, vid, "expected a non-empty list of QA objects")
                clean = []
                for j, qa in enumerate(qas):
                    for key in ("question", "answer"):
                        if not isinstance(qa, dict) or not isinstance(qa.get(key), str):
                            raise _err(path, n, f"{vid}[{j}].{key}", "expected a string")
                    clean.append(
                        {
                            "question": qa["question"],
                            "answer": qa["answer"],
                            "category": str(qa.get("category", "")),
                        }
                    )
                samples.append(
                    EvalSample(str(vid), str(vid), rng.choice(pool), vtype=vtype, qa=clean)
                )
        if not seen:
            raise EvalDataError(f"{path}: no videos")
    return samples


def load_vdc_pools(path: str | os.PathLike | None, types: list[str]) -> dict[str, list[str]]:
    """Instruction pools, a JSON object ``{type: [instruction, ...]}``; without a file every
    type gets the single default instruction (and a warning: the official pools are not used)."""
    if path is None:
        log.warning(
            "vdc: no --prompt-pools file; every type uses %r (the official per-type pools ship "
            "with VDC's code)",
            DEFAULT_INSTRUCTION,
        )
        return {t: [DEFAULT_INSTRUCTION] for t in types}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalDataError(f"--prompt-pools {path}: cannot read a JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise EvalDataError(f"--prompt-pools {path}: expected {{type: [instructions]}}")
    pools = {}
    for t in types:
        pool = data.get(t)
        if not isinstance(pool, list) or not pool or not all(isinstance(p, str) for p in pool):
            raise _err(path, "", t, "expected a non-empty list of instructions")
        pools[t] = pool
    return pools


# ------------------------------------------------------------------------------ videos
def resolve_video(videos_dir: Path, name: str) -> Path | None:
    """``DIR/name``, or ``DIR/name.<ext>`` for names given without an extension."""
    candidate = videos_dir / name
    if candidate.is_file():
        return candidate
    for ext in _VIDEO_EXTS:
        p = videos_dir / f"{name}{ext}"
        if p.is_file():
            return p
    return None


def check_videos(
    samples: list[EvalSample], videos_dir: str | os.PathLike, on_missing: str
) -> tuple[list[EvalSample], list[str]]:
    """(samples whose video exists, names of the missing videos); ``on_missing="stop"`` raises
    with the list instead."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise EvalDataError(f"--videos {videos_dir}: not a directory")
    kept, missing = [], []
    for s in samples:
        p = resolve_video(videos_dir, s.video)
        if p is None:
            missing.append(s.video)
        else:
            s.video_path = str(p)
            kept.append(s)
    missing = list(dict.fromkeys(missing))
    if missing:
        listed = ", ".join(missing[:20]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 20 else ""
        )
        if on_missing == "stop":
            raise EvalDataError(
                f"--videos {videos_dir}: {len(missing)} video(s) missing: {listed} "
                "(--on-missing skip drops and counts them)"
            )
        log.warning(
            "--videos %s: skipping %d missing video(s): %s", videos_dir, len(missing), listed
        )
    return kept, missing


# ------------------------------------------------------------------------------ predictions
@dataclass
class Prediction:
    caption: str
    think: str | None = None
    response: str | None = None  # the raw model output, when generated here


def read_predictions(path: str | os.PathLike, *, vdc: bool) -> dict[str, Prediction]:
    """``{sample key: Prediction}`` from a predictions JSONL (see the module docstring)."""
    path = Path(path)
    out: dict[str, Prediction] = {}
    lines: dict[str, int] = {}
    for n, obj in _json_lines(path):
        if "id" not in obj or isinstance(obj["id"], (bool, dict, list)) or obj["id"] is None:
            raise _err(path, n, "id", "missing")
        caption = obj.get("caption")
        if not isinstance(caption, str):
            raise _err(path, n, "caption", "expected a string")
        key = str(obj["id"])
        if vdc:
            vtype = obj.get("type")
            if vtype not in VDC_TYPES:
                raise _err(
                    path, n, "type", f"expected one of {', '.join(VDC_TYPES)}, got {vtype!r}"
                )
            key = f"{vtype}/{key}"
        if key in lines:
            raise _err(path, n, "id", f"{key} repeats line {lines[key]}")
        lines[key] = n
        think = obj.get("think")
        out[key] = Prediction(
            caption, think if isinstance(think, str) else None, obj.get("response")
        )
    return out
