"""Manifest validation: every line checked, every problem reported with its line number.

Checks, per line: valid JSON, the schema (required fields and types, see ``manifest.py``),
unique ids, the video file exists, and the video opens and decodes with the training settings
(frame plan, pixel budget, clip range). ``full_decode`` additionally decodes every frame, which
finds corruption between the sampled frames. Decoding runs in worker processes when asked;
one bad video never stops the others from being checked.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_vcap.data.config import DataConfig
from megatron_vcap.data.manifest import Problem, Sample, parse_manifest
from megatron_vcap.progress import progress


@dataclass
class ValidationReport:
    path: Path
    num_lines: int
    num_ok: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [p.format(self.path) for p in self.problems]
        bad = len({p.line for p in self.problems})
        lines.append(
            f"{self.path}: {self.num_lines} sample line(s) checked: {self.num_ok} ok, {bad} bad"
        )
        return "\n".join(lines)


def _full_decode(path: str) -> int:
    """Decode every frame with PyAV; returns the frame count, raises on a decoder error."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        return sum(1 for _ in container.decode(stream))


def check_sample_video(
    sample: Sample, cfg: DataConfig, decode: bool = True, full_decode: bool = False
) -> str | None:
    """None when the sample's video is usable, else a one-line reason."""
    from megatron_vcap.data.video_io import VideoDataError
    from megatron_vcap.data.vision import process_sample_video

    if not os.path.isfile(sample.video):
        return f"video file not found: {sample.video}"
    if not decode:
        return None
    try:
        video = process_sample_video(sample, cfg)
    except VideoDataError as exc:
        return f"video {exc.reason}: {exc.detail} ({sample.video})"
    except Exception as exc:  # report, never crash the validation of the other lines
        return f"video failed to process: {type(exc).__name__}: {exc} ({sample.video})"
    if full_decode:
        try:
            count = _full_decode(sample.video)
        except Exception as exc:
            return f"video corrupt: full decode failed: {exc} ({sample.video})"
        if count < video.frame_indices[-1] + 1:
            return f"video truncated: only {count} frames decode ({sample.video})"
    return None


def _check(args) -> tuple[int, str | None]:
    sample, cfg, decode, full_decode = args
    return sample.line, check_sample_video(sample, cfg, decode, full_decode)


def _count_sample_lines(path: Path) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for text in f if text.strip())


def validate_manifest(
    path: str | os.PathLike,
    cfg: DataConfig | None = None,
    *,
    decode: bool = True,
    full_decode: bool = False,
    workers: int = 1,
    show_progress: bool = False,
) -> ValidationReport:
    """Check every line of a manifest; never raises on bad content (a missing manifest does).
    ``show_progress``: a bar on a terminal's stderr."""
    cfg = cfg or DataConfig()
    path = Path(path)
    samples, problems = parse_manifest(path)
    num_lines = _count_sample_lines(path)
    if samples:
        jobs = [(s, cfg, decode, full_decode) for s in samples]
        ids = {s.line: s.id for s in samples}
        bar = dict(total=len(jobs), desc="samples", unit="sample", enabled=show_progress)
        if workers > 1 and decode:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(progress(pool.map(_check, jobs, chunksize=4), **bar))
        else:
            results = [_check(job) for job in progress(jobs, **bar)]
        problems += [Problem(line, f"[{ids[line]}] {msg}") for line, msg in results if msg]
    problems.sort(key=lambda p: p.line)
    bad_lines = {p.line for p in problems}
    return ValidationReport(path, num_lines, num_lines - len(bad_lines), problems)
