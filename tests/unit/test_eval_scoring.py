"""``vcap eval dream1k | carebench | vdc --predictions``: fixtures in the official formats, a
scripted judge on a real loopback HTTP server, results.json against hand computations written
here (not the code under test)."""

from __future__ import annotations

import json

import pytest

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.testing.fake_openai import FakeOpenAIServer
from tests.unit.evalkit import GARBAGE, ScriptedJudge, dream_line, judge_flags, write_jsonl

SECRET = "sk-eval-test-1234"
TEXT = (".json", ".jsonl", ".md")


def f1(p, r):
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------------------ DREAM-1K
def dream_fixture(tmp_path):
    ann = write_jsonl(
        tmp_path / "DREAM-1k.jsonl",
        [
            dream_line(0, "movie_live_action", "a.mp4", "A Man Runs.", ["g0a", "g0b"],
                       n_subjects=1, n_shots=1),
            dream_line(1, "movie_live_action", "b.mp4", "A dog sits.", ["g1a"],
                       n_subjects=2, n_shots=1),
            dream_line(2, "videvo", "c.mp4", "Clouds drift.", [], n_subjects=0, n_shots=1),
            dream_line(3, "videvo", "d.mp4", "Cars pass.", ["g3a", "g3b", "g3c", "g3d"],
                       n_subjects=4, n_shots=2),
            dream_line(4, "youtube", "e.mp4", "A cat jumps.", ["g4a"], n_subjects=1, n_shots=1),
            dream_line(5, "youtube", "f.mp4", "A kid waves.", ["g5a"], n_subjects=1, n_shots=3),
        ],
    )  # fmt: skip
    preds = write_jsonl(
        tmp_path / "preds.jsonl",
        [
            {"id": 0, "caption": 'The Man "runs" fast.'},
            {"id": 1, "caption": "dog one"},
            {"id": 2, "caption": "sky two"},
            {"id": 3, "caption": "road three"},
            {"id": 4, "caption": "cat four"},
            {"id": 5, "caption": "kid five"},
        ],
    )
    judge = ScriptedJudge(
        # The caption arrives lower-cased with double quotes turned into single ones.
        extract={
            "the man 'runs' fast.": ["p0a", "p0b", "p0c"],
            "dog one": ["p1a"],
            "sky two": ["p2a", "p2b"],
            "road three": [],
            "cat four": GARBAGE,  # stays unusable: sample 4 is dropped and counted
            "kid five": ["p5a"],
        },
        verdicts={
            "g0a": "entailment",
            "g0b": "neutral",
            "p0a": "entailment",
            "p0b": "contradiction",
            "p0c": "entailment",
            "g1a": "entailment",
            "p1a": "neutral",
            "p2a": "entailment",
            "p2b": "entailment",
            "g3a": "entailment",
            "g3b": "neutral",
            "g3c": "contradiction",
            "g3d": "neutral",
            "g4a": "entailment",
            "g5a": "entailment",
            "p5a": "entailment",
        },  # fmt: skip
        style={"kid five": "fenced", "g5a": "fenced", "p5a": "python", "g0a": "nobrace"},
    )
    return ann, preds, judge


def test_dream1k_macro_over_subsets_empty_lists_failures_and_clean_up(tmp_path, monkeypatch):
    ann, preds, judge = dream_fixture(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv("VCAP_EVAL_TEST_KEY", SECRET)
    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        code = vcap_main(
            ["eval", "dream1k", "--annotations", str(ann), "--predictions", str(preds),
             *judge_flags(server, out, judge_key_env="VCAP_EVAL_TEST_KEY")]
        )  # fmt: skip
    assert code == 0
    # The key goes from the named variable to the server, and nowhere into the outputs.
    assert server.auth_headers == {f"Bearer {SECRET}"}
    assert all(SECRET not in p.read_text() for p in out.rglob("*") if p.suffix in TEXT)
    res = json.loads((out / "results.json").read_text())

    # Hand computation. Per sample (R, P): s0 (1/2, 2/3); s1 (1, 0); s2 (1.0 empty GT, 1);
    # s3 (1/4, 1.0 empty prediction list); s4 dropped; s5 (1, 1).
    live = {"r": (0.5 + 1) / 2, "p": (2 / 3 + 0) / 2}
    videvo = {"r": (1 + 0.25) / 2, "p": (1 + 1) / 2}
    youtube = {"r": 1.0, "p": 1.0}
    r = (live["r"] + videvo["r"] + youtube["r"]) / 3
    p = (live["p"] + videvo["p"] + youtube["p"]) / 3
    assert res["overall"]["recall"] == pytest.approx(r)
    assert res["overall"]["precision"] == pytest.approx(p)
    assert res["overall"]["f1"] == pytest.approx(f1(p, r))  # F1 of the means
    assert res["subsets"]["movie_live_action"]["f1"] == pytest.approx(f1(live["p"], live["r"]))
    assert res["subsets"]["videvo"]["n"] == 2 and res["subsets"]["youtube"]["n"] == 1
    assert res["subsets"]["movie_animation"]["n"] == 0
    assert res["failed"] == 1 and res["num_samples"] == 6
    # Buckets pool samples: n_events <=3 holds s0, s1, s2, s5; 4-5 holds s3.
    low = res["buckets"]["n_events"]["<=3"]
    assert low["recall"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert low["precision"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert res["buckets"]["n_events"]["4-5"]["recall"] == pytest.approx(0.25)
    subj = res["buckets"]["n_subjects"]
    assert subj["<=1"]["n"] == 3 and subj["2"]["n"] == 1 and subj[">=4"]["n"] == 1
    assert res["settings"]["judge_model"] == "judge-x"
    assert res["settings"]["judge_endpoint"] == server.base_url

    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6
    s0 = records[0]
    assert s0["pred_items"] == ["p0a", "p0b", "p0c"] and s0["recall"] == 0.5
    assert [v["relationship"] for v in s0["precision_verdicts"]] == [
        "entailment", "contradiction", "entailment"]  # fmt: skip
    assert s0["recall_verdicts"][0]["reason"] == "because"
    assert "error" in records[4] and "garbage" not in records[4]
    assert (out / "report.md").read_text().count("| videvo |") == 1
    assert (out / "dream1k.png").stat().st_size > 1000
    # Retries: sample 4's extraction was asked 1 + 2 times; no request carried a schema.
    assert [n for k, n in judge.prompts.items() if k.startswith("Break") and "cat four" in k] == [3]
    assert all("response_format" not in b for b in server.bodies)


def test_missing_captions_stop_or_skip(tmp_path, capsys):
    ann, preds, judge = dream_fixture(tmp_path)
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join(lines[:-1]) + "\n")  # no caption for idx 5
    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        argv = ["eval", "dream1k", "--annotations", str(ann), "--predictions", str(preds),
                *judge_flags(server, tmp_path / "o1")]  # fmt: skip
        assert vcap_main(argv) == 2
        assert "no caption for 1 sample(s): 5" in capsys.readouterr().err
        assert vcap_main([*argv, "--on-missing", "skip"]) == 0
        # --limit 2: the first two samples only, recorded in the settings.
        argv = [*argv[:6], *judge_flags(server, tmp_path / "o2"), "--limit", "2"]
        assert vcap_main(argv) == 0
    res = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert res["missing"] == 1 and res["num_samples"] == 5
    res = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert res["num_samples"] == 2 and res["settings"]["limit"] == 2


# ------------------------------------------------------------------------------ CAREBENCH
def test_carebench_action_and_object_overall_and_per_category(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ann = tmp_path / "CAREBENCH.json"
    ann.write_text(
        json.dumps(
            [
                {"video": "v1.mp4", "caption": "Ref One.", "category": "Personal Care",
                 "events": ["e1a", "e1b"], "objects": ["o1a"]},
                {"video": "v2.mp4", "caption": "Ref Two.", "category": "Personal Care",
                 "events": ["e2a"]},  # no objects: extracted from the reference
                {"video": "v3.mp4", "caption": "Ref Three.", "category": "Sports & Exercise",
                 "events": ["e3a"], "objects": []},
            ]
        )
    )  # fmt: skip
    preds = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "v1.mp4", "caption": "cap1"}, {"id": "v2.mp4", "caption": "cap2"},
         {"id": "v3.mp4", "caption": "cap3"}],
    )  # fmt: skip
    # Extraction prompts differ by kind only in the template; both map description -> items.
    judge = ScriptedJudge(
        extract={"cap1": ["x1a", "x1b"], "cap2": ["x2a"], "cap3": ["x3a", "x3b"],
                 "ref two.": ["ro2a", "ro2b"]},
        verdicts={"e1a": "entailment", "e1b": "neutral", "o1a": "entailment",
                  "x1a": "entailment", "x1b": "entailment", "e2a": "contradiction",
                  "ro2a": "entailment", "ro2b": "neutral", "x2a": "entailment",
                  "e3a": "entailment", "x3a": "neutral", "x3b": "entailment"},
    )  # fmt: skip
    out = tmp_path / "out"
    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        assert vcap_main(
            ["eval", "carebench", "--annotations", str(ann), "--predictions", str(preds),
             *judge_flags(server, out)]
        ) == 0  # fmt: skip
    assert server.auth_headers == {"Bearer EMPTY"}  # no key variable: a placeholder key
    res = json.loads((out / "results.json").read_text())
    # The same extraction answer serves both kinds here, so each caption's items are shared:
    # action  R: v1 1/2, v2 0, v3 1;      P: v1 1, v2 1, v3 1/2
    # object  R: v1 1, v2 1/2, v3 1 (empty GT); P: v1 1, v2 1, v3 1/2
    ar, ap = (0.5 + 0 + 1) / 3, (1 + 1 + 0.5) / 3
    orr, op = (1 + 0.5 + 1) / 3, (1 + 1 + 0.5) / 3
    assert res["action"]["overall"]["recall"] == pytest.approx(ar)
    assert res["action"]["overall"]["precision"] == pytest.approx(ap)
    assert res["action"]["overall"]["f1"] == pytest.approx(f1(ap, ar))
    assert res["object"]["overall"]["f1"] == pytest.approx(f1(op, orr))
    pc = res["action"]["categories"]["Personal Care"]
    assert pc["recall"] == pytest.approx(0.25) and pc["precision"] == pytest.approx(1.0)
    assert res["object"]["categories"]["Sports & Exercise"]["precision"] == pytest.approx(0.5)
    assert res["failed"] == 0 and res["num_samples"] == 3


# ------------------------------------------------------------------------------ VDC
def test_vdc_official_drops_zero_videos_unbiased_keeps_them(tmp_path):
    qa = tmp_path / "qa"
    qa.mkdir()
    write_jsonl(qa / "camera.jsonl", [
        {"v1": [{"question": "c1q1", "answer": "A1", "category": "x"},
                {"question": "c1q2", "answer": "A2", "category": "x"}]},
        {"v2": [{"question": "c2q1", "answer": "A3", "category": "y"}]},
    ])  # fmt: skip
    write_jsonl(qa / "short.jsonl", [
        {"v1": [{"question": "s1q1", "answer": "B1", "category": "z"},
                {"question": "s1q2", "answer": "B2", "category": "z"},
                {"question": "s1q3", "answer": "B3", "category": "z"}]},
    ])  # fmt: skip
    preds = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "v1", "type": "camera", "caption": "cam one"},
         {"id": "v2", "type": "camera", "caption": "cam two"},
         {"id": "v1", "type": "short", "caption": "short one"}],
    )  # fmt: skip
    answers = {q: f"ans {q}" for q in ("c1q1", "c1q2", "c2q1", "s1q1", "s1q2", "s1q3")}
    verdicts = {
        ("c1q1", "ans c1q1"): ("yes", 4),
        ("c1q2", "ans c1q2"): ("no", 1),
        ("c2q1", "ans c2q1"): ("no", 0),  # v2: accuracy 0 -> dropped by the official script
        ("s1q1", "ans s1q1"): ("yes", 5),
        ("s1q2", "ans s1q2"): ("yes", 3),
        ("s1q3", "ans s1q3"): GARBAGE,  # unusable after retries: the QA is dropped, counted
    }
    judge = ScriptedJudge(vdc_answers=answers, vdc_verdicts=verdicts)
    out = tmp_path / "out"
    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        assert vcap_main(
            ["eval", "vdc", "--qa-dir", str(qa), "--predictions", str(preds),
             "--types", "camera,short", "--vdc-aggregation", "unbiased",
             *judge_flags(server, out)]
        ) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["aggregation"] == "unbiased" and res["aggregations"] == ["unbiased", "official"]
    # unbiased: camera = mean(v1 0.5 / 2.5, v2 0 / 0); short = v1 1.0 / 4.0
    assert res["types"]["camera"] == pytest.approx({"accuracy": 0.25, "score": 1.25, "n": 2})
    assert res["types"]["short"] == pytest.approx({"accuracy": 1.0, "score": 4.0, "n": 1})
    assert res["average"] == pytest.approx({"accuracy": 0.625, "score": 2.625})
    official = res["by_aggregation"]["official"]
    assert official["types"]["camera"] == pytest.approx({"accuracy": 0.5, "score": 2.5, "n": 1})
    assert official["average"] == pytest.approx({"accuracy": 0.75, "score": 3.25})
    assert res["failed_qa"] == 1 and res["failed"] == 0 and res["num_samples"] == 3
    report = (out / "report.md").read_text()
    assert report.index("unbiased aggregation") < report.index("official aggregation")
    assert (out / "vdc.png").stat().st_size > 1000
