"""``vcap data annotate``: fill a manifest's missing structures and events with the judge.

    vcap data annotate --manifest IN --out OUT [--judge openai --judge-url URL ...]
                       [--only subjects|events|both] [--allow-partial]

For every sample whose ``subjects`` (or ``events``) are empty, the judge reads the reference
caption and answers validated JSON (see ``rewards.prompts``). Finished samples are appended to a
journal (``OUT.partial.jsonl``) as they complete, so an interrupted run resumes where it
stopped; OUT is written atomically once every sample is done, and the journal removed. A sample
whose judge call failed after retries is reported with its reason and left for the next run
(OUT is not written unless ``--allow-partial``). The embedded judge can fill events only (its
clause splitting is a rough approximation); structures need an LLM judge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rewards.cli import add_judge_arguments, build_configs

log = logging.getLogger(__name__)


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def load_journal(path: Path, known_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Completed annotations by sample id; a torn last line (a crash mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            try:
                entry = json.loads(text)
                sid = entry["id"]
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: ignoring an unreadable journal line", path, line_no)
                continue
            if sid in known_ids:
                done[sid] = entry
    return done


def _end_torn_line(path: Path) -> None:
    """Terminate a line torn by a crash, so that new entries start on a line of their own."""
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _needs(sample, only: str) -> tuple[bool, bool]:
    want_subjects = only in ("subjects", "both") and not sample.subjects
    want_events = only in ("events", "both") and not sample.events
    return want_subjects, want_events


async def _annotate_one(judge, sample, only: str) -> dict[str, Any]:
    from megatron_vcap.rewards.judges.base import JudgeError

    want_subjects, want_events = _needs(sample, only)
    entry: dict[str, Any] = {"id": sample.id}
    try:
        if want_subjects:
            entry["subjects"] = [s.to_dict() for s in await judge.extract_structure(sample.caption)]
        if want_events:
            entry["events"] = await judge.extract_events(sample.caption)
    except JudgeError as exc:
        return {"id": sample.id, "error": str(exc)}
    except Exception as exc:  # a bug: report the sample, keep the others going
        log.exception("annotate: judge raised on %s", sample.id)
        return {"id": sample.id, "error": f"judge_error: {type(exc).__name__}: {exc}"}
    return entry


async def _run(judge, pending, only: str, journal: Path, window: int, quiet: bool, initial: int):
    from tqdm import tqdm

    gate = asyncio.Semaphore(window)  # bounds coroutines alive at once for huge manifests

    async def one(sample):
        async with gate:
            return await _annotate_one(judge, sample, only)

    errors: dict[str, str] = {}
    _end_torn_line(journal)
    tasks = [asyncio.ensure_future(one(s)) for s in pending]
    try:
        with open(journal, "a", encoding="utf-8") as f, tqdm(
            total=initial + len(pending), initial=initial, desc="annotating", unit="sample",
            file=sys.stderr, disable=quiet,
        ) as bar:  # fmt: skip
            for next_done in asyncio.as_completed(tasks):
                entry = await next_done
                if "error" in entry:
                    errors[entry["id"]] = entry["error"]
                else:
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    f.flush()  # a crash loses at most the line being written
                bar.update(1)
    finally:
        for t in tasks:
            t.cancel()
        await judge.aclose()
    return errors


def annotate_main(args: argparse.Namespace) -> int:
    from megatron_vcap.data.manifest import ManifestError, load_manifest, write_manifest
    from megatron_vcap.rewards.judges import build_judge
    from megatron_vcap.structure import Subject

    _, judge_cfg = build_configs(args)
    try:
        samples = load_manifest(args.manifest)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out)
    if out.resolve() == Path(args.manifest).resolve():
        raise ConfigError("--out: must differ from --manifest (the input is never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = journal_path(out)
    done = load_journal(journal, {s.id for s in samples})
    todo = [s for s in samples if any(_needs(s, args.only)) and s.id not in done]
    if judge_cfg.kind == "embedded" and any(_needs(s, args.only)[0] for s in todo):
        raise ConfigError(
            "the embedded judge cannot build subject structures; use --judge openai "
            "(or --only events to fill events alone)"
        )
    n_need = sum(any(_needs(s, args.only)) for s in samples)
    print(f"{len(samples)} samples, {n_need} need annotation, {n_need - len(todo)} already done")
    errors: dict[str, str] = {}
    if todo:
        judge = build_judge(judge_cfg)
        window = max(1, 2 * judge_cfg.concurrency)
        errors = asyncio.run(
            _run(judge, todo, args.only, journal, window, args.quiet, n_need - len(todo))
        )
        done = load_journal(journal, {s.id for s in samples})
    for sample in samples:
        entry = done.get(sample.id)
        if entry is None:
            continue
        if "subjects" in entry and not sample.subjects:
            sample.subjects = [
                Subject.from_dict(d, f"{journal}: {sample.id}") for d in entry["subjects"]
            ]
        if "events" in entry and not sample.events:
            sample.events = list(entry["events"])
    if errors:
        print(f"{len(errors)} sample(s) failed after retries:", file=sys.stderr)
        for sid, reason in list(errors.items())[:20]:
            print(f"  {sid}: {reason}", file=sys.stderr)
        if not args.allow_partial:
            print(
                f"progress kept in {journal}; rerun the same command to retry them", file=sys.stderr
            )
            return 1
    write_manifest(out, samples)
    if not errors:
        journal.unlink(missing_ok=True)
    print(f"wrote {out} ({len(samples)} samples, {len(errors)} left unannotated)")
    return 1 if errors else 0


def add_annotate_parser(data_subparsers) -> None:
    """Register ``vcap data annotate`` (called by ``megatron_vcap/data/cli.py``)."""
    p = data_subparsers.add_parser(
        "annotate", help="fill missing structures / events of a manifest with the judge"
    )
    p.add_argument("--manifest", required=True, help="input manifest JSONL (never modified)")
    p.add_argument("--out", required=True, help="output manifest JSONL")
    p.add_argument(
        "--only",
        choices=["subjects", "events", "both"],
        default="both",
        help="which missing fields to fill",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="write OUT even if some samples failed (they stay unannotated; exit code 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_judge_arguments(p)
    p.set_defaults(func=annotate_main)
