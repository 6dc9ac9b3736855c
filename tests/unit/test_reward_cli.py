"""``vcap reward score``: end to end against a loopback judge, and its input errors."""

from __future__ import annotations

import json

import pytest

from megatron_vcap.cli import main
from megatron_vcap.structure import Subject, render_response
from megatron_vcap.testing.fake_openai import FakeOpenAIServer

GT = Subject("a man", ["tall"], ["does tasks"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def manifest(tmp_path):
    rows = [
        {
            "id": "clip-1",
            "video": "clip-1.mp4",
            "caption": "The man does task0 task1 task2 task3.",
            "subjects": [GT.to_dict()],
            "events": [f"The man does task{i}." for i in range(4)],
        },
        {
            "id": "clip-2",
            "video": "clip-2.mp4",
            "caption": "The man does task0.",
            "subjects": [GT.to_dict()],
            "events": ["The man does task0.", "The man does task9."],
        },
    ]
    return write_jsonl(tmp_path / "manifest.jsonl", rows)


def test_score_writes_every_component_and_a_summary(tmp_path, manifest, capsys):
    responses = write_jsonl(
        tmp_path / "responses.jsonl",
        [
            {"id": "clip-1", "response": render_response([GT], "The man does task0 task1.")},
            {"id": "clip-2", "response": render_response([GT], "The man does task0.")},
            {"id": "clip-1", "response": "I cannot see the video."},
        ],
    )
    out = tmp_path / "scores" / "s.jsonl"
    with FakeOpenAIServer() as server:
        rc = main(
            [
                "reward", "score", "--manifest", str(manifest), "--responses", str(responses),
                "--out", str(out), "--judge", "openai", "--judge-url", server.base_url,
                "--judge-model", "m", "--backend", "lexical", "--quiet",
                "reward.escore_mode=linear", "judge.backoff_s=0.01",
            ]
        )  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert [r["sample_id"] for r in rows] == ["clip-1", "clip-2", "clip-1"]
    # clip-1: 2 of 4 events -> 0.5; clip-2: 1 of 2 -> 0.5; the refusal: parse failure.
    assert [r["caption"] for r in rows] == [0.5, 0.5, 0.0]
    assert [r["total"] for r in rows] == [2.5, 2.5, 0.0]
    assert rows[2]["parse_failure"] == "no_think_block" and rows[2]["failed"] is False
    for key in ("format", "think", "failure_reason", "details"):
        assert key in rows[0]
    summary = json.loads((tmp_path / "scores" / "s.jsonl.summary.json").read_text())
    assert summary["responses"] == 3 and summary["parse_failure/no_think_block_count"] == 1
    assert "total_mean" in capsys.readouterr().out


def test_bad_responses_file_names_file_and_line(tmp_path, manifest, capsys):
    responses = tmp_path / "r.jsonl"
    responses.write_text(
        json.dumps({"id": "clip-1", "response": "x"}) + "\n"
        "{not json\n"
        + json.dumps({"id": "nope", "response": "x"})
        + "\n"
        + json.dumps({"id": "clip-2", "response": 3})
        + "\n"
    )
    rc = main(["reward", "score", "--manifest", str(manifest), "--responses", str(responses),
               "--out", str(tmp_path / "o.jsonl"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{responses}:2: invalid JSON" in err
    assert f"{responses}:3: field 'id': 'nope' is not in the manifest" in err
    assert f"{responses}:4: field 'response'" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_config_values_are_one_line_errors(tmp_path, manifest, capsys):
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "clip-1", "response": "x"}])
    args = ["reward", "score", "--manifest", str(manifest), "--responses", str(responses),
            "--out", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert main([*args, "judge.concurency=3"]) == 2
    assert "judge.concurency" in capsys.readouterr().err
    assert main([*args, "train.lr=3"]) == 2
    assert "only reward.* and judge.*" in capsys.readouterr().err
    assert main([*args, "--judge-concurrency", "0"]) == 2
    assert "concurrency" in capsys.readouterr().err
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text('{"id": "a"}\n')
    assert main(["reward", "score", "--manifest", str(bad_manifest), "--responses", str(responses),
                 "--out", str(tmp_path / "o.jsonl")]) == 2  # fmt: skip
    assert f"{bad_manifest}:1" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 14, items 5 and 7
def _responses(tmp_path, n=4):
    rows = [
        {"id": "clip-1" if i % 2 == 0 else "clip-2",
         "response": render_response([GT], f"The man does task0 take{i}.")}
        for i in range(n)
    ]  # fmt: skip
    return write_jsonl(tmp_path / "responses.jsonl", rows)


def _score(manifest, responses, out, server, *extra):
    return main(
        [
            "reward", "score", "--manifest", str(manifest), "--responses", str(responses),
            "--out", str(out), "--judge", "openai", "--judge-url", server.base_url,
            "--judge-model", "m", "--quiet", "reward.escore_mode=linear",
            "judge.backoff_s=0.01", "judge.max_backoff_s=0.02", *extra,
        ]
    )  # fmt: skip


def test_exit_1_when_judge_failures_exceed_the_fraction(tmp_path, manifest, capsys):
    responses = _responses(tmp_path, 4)
    with FakeOpenAIServer(script=["http_401"] * 3) as server:  # 401 is not retried
        rc = _score(manifest, responses, tmp_path / "s.jsonl", server)
    captured = capsys.readouterr()
    assert rc == 1
    assert "failed on 3 of 4 judged responses" in captured.err
    assert "http_401: 3" in captured.err and "--max-failure-fraction 0.05" in captured.err
    # Everything is still written, failures included.
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and sum(r["failed"] for r in rows) == 3
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    assert summary["judge/requests"] == 4 and summary["judge/failed/http_401"] == 3
    # A looser bar accepts the same run.
    with FakeOpenAIServer(script=["http_401"] * 3) as server:
        rc = _score(manifest, responses, tmp_path / "t.jsonl", server,
                    "--max-failure-fraction", "0.8", "--no-judge-cache")  # fmt: skip
    assert rc == 0


def test_judge_cache_is_on_by_default_next_to_the_output(tmp_path, manifest):
    responses = _responses(tmp_path, 4)
    out = tmp_path / "s.jsonl"
    with FakeOpenAIServer() as server:
        assert _score(manifest, responses, out, server) == 0
        assert server.stats["requests"] == 4
    assert len(list((tmp_path / "s.jsonl.judge_cache").rglob("*.json"))) == 4
    first = out.read_text()
    # A rerun is answered from the cache: a server that only fails is never asked.
    out.unlink()
    with FakeOpenAIServer(faults={"http_500": 1.0}) as server:
        assert _score(manifest, responses, out, server) == 0
        assert server.stats["requests"] == 0
    assert out.read_text() == first


def test_resume_from_a_partial_output(tmp_path, manifest, capsys):
    responses = _responses(tmp_path, 6)
    full = tmp_path / "full.jsonl"
    with FakeOpenAIServer() as server:
        assert _score(manifest, responses, full, server, "--no-judge-cache") == 0
    lines = full.read_text().splitlines(keepends=True)
    # A killed run: three lines written, the fourth torn mid-write.
    out = tmp_path / "s.jsonl"
    (tmp_path / "s.jsonl.partial").write_text("".join(lines[:3]) + lines[3][:25])
    with FakeOpenAIServer() as server:
        assert _score(manifest, responses, out, server, "--no-judge-cache") == 0
        assert server.stats["requests"] == 3  # only the unscored responses
    assert "resuming: 3 of 6" in capsys.readouterr().err
    assert out.read_text() == full.read_text()
    assert not (tmp_path / "s.jsonl.partial").exists()
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    assert summary["responses"] == 6 and summary["resumed"] == 3
    # A partial output that is not this run's is refused, naming the line.
    (tmp_path / "s.jsonl.partial").write_text(lines[1])
    with FakeOpenAIServer() as server:
        assert _score(manifest, responses, out, server) == 2
    assert "s.jsonl.partial:1: does not match the responses file" in capsys.readouterr().err


def test_a_key_passed_as_the_variable_name_is_never_echoed(tmp_path, manifest, capsys):
    key = "sk-proj-Zq8xW3vB6nM1kL4jH7gF0dS9aP2oI5uY"
    responses = _responses(tmp_path, 1)
    with FakeOpenAIServer() as server:
        rc = _score(manifest, responses, tmp_path / "s.jsonl", server, "--judge-key-env", key)
    captured = capsys.readouterr()
    assert rc == 2
    assert key not in captured.err and key not in captured.out
    assert "looks like an API key" in captured.err
