"""Manifests and ``vcap data synth`` / ``vcap data validate`` from the command line.

The validation test writes a manifest with one defect per line (bad JSON, missing / mistyped /
misspelt fields, missing, truncated, garbage and zero-frame videos, an impossible clip, a
duplicate id) between good lines, and checks that every bad line - and no good one - is named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.data.manifest import (
    ManifestError,
    Sample,
    load_manifest,
    parse_manifest,
    write_manifest,
)
from megatron_vcap.structure import Subject

GOOD = {
    "video": "clip.mp4",
    "caption": "A cat sleeps.",
    "subjects": [{"description": "a cat", "attributes": ["grey"], "actions": ["sleeps"]}],
    "events": ["The cat sleeps."],
}


def _write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_parse_paths_ids_and_roundtrip(tmp_path):
    other, base = tmp_path / "elsewhere", tmp_path / "data"
    other.mkdir()
    base.mkdir()
    m = _write_lines(
        base / "m.jsonl",
        [
            GOOD,
            "",
            {**GOOD, "id": "abs", "video": str(other / "x.mp4"), "start": 1, "end": 2.5},
        ],
    )
    samples = load_manifest(m)
    assert samples[0].id == "clip#1" and samples[0].line == 1
    assert samples[0].video == str(base / "clip.mp4")  # relative to the manifest
    assert samples[1].video == str(other / "x.mp4") and (samples[1].start, samples[1].end) == (
        1.0,
        2.5,
    )
    assert samples[0].subjects == [Subject("a cat", ["grey"], ["sleeps"])]
    out = write_manifest(base / "copy.jsonl", samples)
    stored = [json.loads(x) for x in out.read_text().splitlines()]
    assert stored[0]["video"] == "clip.mp4" and stored[1]["video"] == str(other / "x.mp4")
    again = load_manifest(out)
    assert [(s.id, s.video, s.caption, s.start, s.end, s.subjects, s.events) for s in again] == [
        (s.id, s.video, s.caption, s.start, s.end, s.subjects, s.events) for s in samples
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"video": "a.mp4",', "invalid JSON"),
        ('"just a string"', "expected a JSON object"),
        ({"caption": "x"}, "missing required field 'video'"),
        ({"video": "a.mp4", "caption": ""}, "field 'caption'"),
        ({**GOOD, "start": "soon"}, "field 'start'"),
        ({**GOOD, "start": 3, "end": 1}, "field 'end': must be > start"),
        ({**GOOD, "events": ["ok", 5]}, r"field 'events\[1\]'"),
        ({**GOOD, "subjects": [{"attributes": []}]}, r"subjects\[0\].description"),
        ({**GOOD, "captoin": "x"}, "unknown field 'captoin' \\(did you mean 'caption'\\?\\)"),
    ],
)
def test_malformed_lines_name_line_and_field(tmp_path, line, message):
    m = _write_lines(tmp_path / "m.jsonl", [GOOD, line])
    with pytest.raises(ManifestError, match=rf"m.jsonl:2: .*{message}"):
        load_manifest(m)
    samples, problems = parse_manifest(m)
    assert len(samples) == 1 and [p.line for p in problems] == [2]


def _run_vcap(*args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "megatron_vcap", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_synth_then_validate_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "ds"
    run = _run_vcap(
        "data",
        "synth",
        "--out",
        str(out),
        "--num-videos",
        "3",
        "--seed",
        "5",
        "--width",
        "96",
        "--height",
        "64",
        "--fps",
        "6",
        "--seconds",
        "2",
    )
    assert run.returncode == 0, run.stderr
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert len(list((out / "videos").glob("*.mp4"))) == 3
    assert vcap_main(["data", "validate", str(out / "manifest.jsonl")]) == 0
    assert "3 sample line(s) checked: 3 ok, 0 bad" in capsys.readouterr().out

    videos = out / "videos"
    good = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    data = (videos / "synth_00001.mp4").read_bytes()
    (videos / "half.mp4").write_bytes(data[: len(data) // 2])
    (videos / "junk.mp4").write_bytes(b"\x00\x01junk" * 300)
    (videos / "empty.mp4").write_bytes(b"")
    lines = [
        good,  # 1 ok
        '{"video": "videos/synth_00001.mp4", "caption": "x"',  # 2 bad JSON
        {**good, "id": "nocap", "caption": None},  # 3 caption type
        {**good, "id": "gone", "video": "videos/gone.mp4"},  # 4 missing file
        {**good, "id": "half", "video": "videos/half.mp4"},  # 5 truncated
        {**good, "id": "junk", "video": "videos/junk.mp4"},  # 6 not a video
        {**good, "id": "empty", "video": "videos/empty.mp4"},  # 7 empty file
        {**good, "id": "late", "start": 30.0},  # 8 clip past the end
        {**good, "id": "typo", "subject": []},  # 9 misspelt field
        {**good, "id": "ok2", "video": "videos/synth_00002.mp4"},  # 10 ok
        good,  # 11 duplicate id
    ]
    bad = _write_lines(out / "bad.jsonl", lines)
    run = _run_vcap("data", "validate", str(bad))
    assert run.returncode == 1
    report = run.stderr.strip().splitlines()
    named = [
        int(x.split(":")[1])
        for x in report
        if x.startswith(str(bad) + ":") and x.split(":")[1].isdigit()
    ]
    assert named == [2, 3, 4, 5, 6, 7, 8, 9, 11], run.stderr
    text = run.stderr
    assert "bad.jsonl:4: [gone] video file not found" in text
    assert "bad.jsonl:5: [half] video" in text and "bad.jsonl:6: [junk] video" in text
    assert "bad.jsonl:7: [empty] video unreadable: the file is empty" in text
    assert "bad.jsonl:8: [late] video bad_range" in text
    assert "unknown field 'subject'" in text and "repeats line 1" in text
    assert report[-1].endswith("11 sample line(s) checked: 2 ok, 9 bad")
    assert "Traceback" not in text


def test_validate_usage_errors(tmp_path, capsys):
    assert vcap_main(["data", "validate", str(tmp_path / "none.jsonl")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    write_manifest(tmp_path / "m.jsonl", [Sample("a", str(tmp_path / "v.mp4"), "cap")])
    assert vcap_main(["data", "validate", str(tmp_path / "m.jsonl"), "data.max_frames=0"]) == 2
    assert "data.max_frames: must be >= max(min_frames, 2)" in capsys.readouterr().err
    # The syntax of vcap train: a bare key is an error that shows the dotted form.
    assert vcap_main(["data", "validate", str(tmp_path / "m.jsonl"), "max_frames=16"]) == 2
    assert "e.g. 'data.max_frames=...'" in capsys.readouterr().err
