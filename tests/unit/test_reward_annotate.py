"""``vcap data annotate``: fills missing structures / events with the judge; resumable."""

from __future__ import annotations

import json

import pytest

from megatron_vcap.cli import main
from megatron_vcap.data.manifest import load_manifest
from megatron_vcap.rewards.annotate import journal_path
from megatron_vcap.structure import Subject
from megatron_vcap.testing.fake_openai import FakeOpenAIServer

COMPLETE = {
    "id": "done",
    "video": "a.mp4",
    "caption": "A cat sleeps.",
    "subjects": [{"description": "a cat", "attributes": ["grey"], "actions": ["sleeps"]}],
    "events": ["The cat sleeps."],
}


@pytest.fixture
def manifest(tmp_path):
    rows = [
        COMPLETE,
        {
            "id": "no-subjects",
            "video": "b.mp4",
            "caption": "A man runs fast. A dog barks.",
            "events": ["x y"],
        },
        {"id": "bare", "video": "c.mp4", "caption": "A woman opens an umbrella."},
        {"id": "bare-2", "video": "d.mp4", "caption": "A bird sings loudly."},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def annotate(server, manifest, out, *extra):
    return main(
        ["data", "annotate", "--manifest", str(manifest), "--out", str(out), "--quiet",
         "--judge", "openai", "--judge-url", server.base_url, "--judge-model", "m",
         "--judge-concurrency", "1", "judge.backoff_s=0.01", *extra]
    )  # fmt: skip


def test_fills_missing_fields_from_the_judge(tmp_path, manifest):
    before = manifest.read_text()
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer() as server:
        assert annotate(server, manifest, out) == 0
        # no-subjects: 1 structure call; bare and bare-2: structure + events each.
        assert server.stats["requests"] == 5
    assert manifest.read_text() == before
    samples = {s.id: s for s in load_manifest(out)}
    assert samples["done"].subjects == [Subject("a cat", ["grey"], ["sleeps"])]
    assert samples["done"].events == ["The cat sleeps."]
    # The fake judge's structure: one subject per sentence, first two words as description.
    assert samples["no-subjects"].subjects == [
        Subject("A man", [], ["runs fast"]),
        Subject("A dog", [], ["barks"]),
    ]
    assert samples["no-subjects"].events == ["x y"]  # present: left alone
    assert samples["bare"].events == ["A woman opens an umbrella."]
    assert samples["bare"].subjects == [Subject("A woman", [], ["opens an umbrella"])]
    assert not journal_path(out).exists()


def test_failed_samples_are_reported_and_a_rerun_resumes(tmp_path, manifest, capsys):
    out = tmp_path / "out.jsonl"
    # The first request is refused for good (400 is not retried): that sample fails.
    with FakeOpenAIServer(script=["http_400"]) as server:
        assert annotate(server, manifest, out) == 1
    err = capsys.readouterr().err
    assert "1 sample(s) failed after retries" in err and "http_400" in err
    assert not out.exists()
    journal = journal_path(out)
    done_ids = {json.loads(line)["id"] for line in journal.read_text().splitlines()}
    assert len(done_ids) == 2
    failed_id = ({"no-subjects", "bare", "bare-2"} - done_ids).pop()
    # A crash mid-write leaves a torn line: it is ignored.
    with open(journal, "a") as f:
        f.write('{"id": "bare", "subj')
    with FakeOpenAIServer() as server:
        assert annotate(server, manifest, out) == 0
        assert server.stats["requests"] == (1 if failed_id == "no-subjects" else 2)
    samples = {s.id: s for s in load_manifest(out)}
    assert all(s.subjects and s.events for s in samples.values())
    assert not journal.exists()


def test_allow_partial_writes_output_with_failures_unannotated(tmp_path, manifest):
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer(script=["http_400"]) as server:
        assert annotate(server, manifest, out, "--allow-partial") == 1
    samples = load_manifest(out)
    assert sum(not s.subjects for s in samples) == 1
    assert journal_path(out).exists()


def test_embedded_judge_fills_events_only(tmp_path, manifest, capsys):
    out = tmp_path / "out.jsonl"
    args = [
        "data",
        "annotate",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--quiet",
        "--judge",
        "embedded",
    ]
    assert main(args) == 2
    assert "cannot build subject structures" in capsys.readouterr().err
    assert main([*args, "--only", "events"]) == 0
    samples = {s.id: s for s in load_manifest(out)}
    assert (
        samples["bare"].events == ["A woman opens an umbrella"] and samples["bare"].subjects == []
    )
    assert main(["data", "annotate", "--manifest", str(manifest), "--out", str(manifest)]) == 2
