"""Benchmark readers: official formats in, every bad line named by file, line and field;
missing videos listed and skipped or stopped on; the answer clean-up; template overrides."""

from __future__ import annotations

import json
import random

import pytest

from megatron_vcap.eval.judging import clean_answer, decode_loose
from megatron_vcap.eval.readers import (
    EvalDataError,
    check_videos,
    load_vdc_pools,
    read_carebench,
    read_dream1k,
    read_predictions,
    read_vdc,
)
from megatron_vcap.eval.templates import load_templates
from megatron_vcap.rewards.prompts import InvalidAnswer
from tests.unit.evalkit import dream_line, write_jsonl


def test_dream1k_reader_fields_and_errors(tmp_path):
    good = dream_line(7, "videvo", "x.mp4", "A ref.", ["e1", "e2"], n_subjects=2, n_shots=1)
    path = write_jsonl(tmp_path / "d.jsonl", [good])
    (s,) = read_dream1k(path)
    assert (s.id, s.video, s.group, s.reference) == ("7", "x.mp4", "videvo", "A ref.")
    assert s.instruction == "Describe the video in detail."
    assert s.gt_items == {"events": ["e1", "e2"]}
    assert s.meta == {"n_subjects": 2, "n_shots": 1, "n_events": 2}

    def broken(mutate, msg):
        obj = json.loads(good)
        mutate(obj)
        p = write_jsonl(tmp_path / "bad.jsonl", [good.replace('"idx": 7', '"idx": 8'), obj])
        with pytest.raises(EvalDataError, match=msg):
            read_dream1k(p)

    broken(lambda o: o["extra_info"].pop("events"), r"bad.jsonl:2: field 'extra_info.events'")
    broken(lambda o: o["extra_info"].update(events="e1"), r":2: field 'events': expected a list")
    broken(lambda o: o.pop("dataset"), r":2: field 'dataset'")
    broken(lambda o: o.update(messages=[o["messages"][0]]), r":2: field 'messages'")
    broken(lambda o: o["extra_info"].update(n_shots="2"), r":2: field 'extra_info.n_shots'")
    broken(lambda o: o.update(idx=8), r":2: field 'idx': 8 repeats line 1")
    (tmp_path / "t.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(EvalDataError, match=r"t.jsonl:2: not valid JSON"):
        read_dream1k(tmp_path / "t.jsonl")


def test_carebench_and_vdc_readers(tmp_path):
    care = tmp_path / "c.json"
    care.write_text(json.dumps([{"video": "a.mp4", "caption": "c", "events": ["e"]},
                                {"video": "b.mp4", "caption": "d", "objects": 3}]))  # fmt: skip
    with pytest.raises(EvalDataError, match=r"c.json:\[1\]: field 'objects'"):
        read_carebench(care)
    care.write_text(json.dumps([{"video": "a.mp4", "caption": "c", "events": ["e"]}]))
    (s,) = read_carebench(care)
    assert s.gt_items == {"events": ["e"], "objects": None} and s.group == ""

    qa = tmp_path / "qa"
    qa.mkdir()
    write_jsonl(qa / "VDC_camera.jsonl", [{"v1": [{"question": "q", "answer": "a"}]},
                                          {"v2": [{"question": "q2", "answer": "b"}]}])  # fmt: skip
    pools = {"camera": [f"instruction {i}" for i in range(16)]}
    (tmp_path / "pools.json").write_text(json.dumps(pools))
    samples = read_vdc(qa, ["camera"], load_vdc_pools(tmp_path / "pools.json", ["camera"]))
    rng = random.Random(0)
    assert [s.instruction for s in samples] == [rng.choice(pools["camera"]) for _ in range(2)]
    assert [s.key for s in samples] == ["camera/v1", "camera/v2"]
    with pytest.raises(EvalDataError, match="need one QA file for type 'short'"):
        read_vdc(qa, ["short"], {"short": ["x"]})
    write_jsonl(qa / "VDC_camera.jsonl", [{"v1": [{"question": "q"}]}])
    with pytest.raises(EvalDataError, match=r"VDC_camera.jsonl:1: field 'v1\[0\].answer'"):
        read_vdc(qa, ["camera"], pools)


def test_predictions_reader_and_missing_videos(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "type": "short", "caption": "x"},
                                           {"id": 1, "type": "short", "caption": "y"}])  # fmt: skip
    with pytest.raises(EvalDataError, match=r"p.jsonl:2: field 'id': short/1 repeats line 1"):
        read_predictions(p, vdc=True)
    write_jsonl(p, [{"id": 1, "caption": "x"}])
    with pytest.raises(EvalDataError, match=r"p.jsonl:1: field 'type'"):
        read_predictions(p, vdc=True)
    assert read_predictions(p, vdc=False)["1"].caption == "x"

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"x")
    (videos / "b.mp4").write_bytes(b"x")
    ann = write_jsonl(tmp_path / "d.jsonl", [
        dream_line(i, "videvo", name, "r", ["e"]) for i, name in enumerate(["a.mp4", "b", "c.mp4"])
    ])  # fmt: skip
    samples = read_dream1k(ann)
    with pytest.raises(EvalDataError, match=r"1 video\(s\) missing: c.mp4"):
        check_videos(samples, videos, "stop")
    kept, missing = check_videos(samples, videos, "skip")
    assert [s.id for s in kept] == ["0", "1"] and missing == ["c.mp4"]
    assert kept[1].video_path.endswith("b.mp4")  # a name without extension resolves


def test_answer_clean_up_rules():
    assert decode_loose('```json\n{"events": ["a",\n "b",],}\n```') == {"events": ["a", "b"]}
    assert decode_loose('"events": ["a"]') == {"events": ["a"]}  # missing outer brace
    assert decode_loose('{"events": [{"x": 1}{"x": 2}]}') == {"events": [{"x": 1}, {"x": 2}]}
    assert decode_loose("Here you go: {'pred': 'yes', 'score': 4}.") == {"pred": "yes", "score": 4}
    assert decode_loose('{"ok": True, "no": False}') == {"ok": True, "no": False}
    assert decode_loose('{"events": ["a"]') == {"events": ["a"]}  # cut before the last brace
    assert clean_answer('  {\n  "a":   1\n}  ') == '{ "a": 1 }'
    with pytest.raises(InvalidAnswer):
        decode_loose("no json here")


def test_templates_override_by_file_and_checked(tmp_path):
    default = load_templates()
    msgs = default["vdc_answer"].render(caption="CAP", question="Q?")
    assert msgs[0]["role"] == "system" and "CAP" in msgs[1]["content"]
    (tmp_path / "vdc_answer.txt").write_text("Official: {{caption}} / {{question}}")
    mine = load_templates(tmp_path)
    assert mine["vdc_answer"].render(caption="C", question="Q") == (
        {"role": "user", "content": "Official: C / Q"},
    )
    assert mine["vdc_judge"].user == default["vdc_judge"].user
    (tmp_path / "vdc_answer.txt").write_text("No placeholders")
    with pytest.raises(ValueError, match=r"vdc_answer.txt: placeholders missing"):
        load_templates(tmp_path)
    (tmp_path / "vdc_anwser.txt").write_text("typo")
    with pytest.raises(ValueError, match="unknown template file"):
        load_templates(tmp_path)


def test_structured_response_answer_block_is_the_caption():
    from megatron_vcap.eval.predict import split_response

    text = "<think>\nSubject 1: a dog\nActions: runs\n</think>\n<answer>\nA dog runs.\n</answer>"
    assert split_response(text) == ("A dog runs.", "Subject 1: a dog\nActions: runs")
    assert split_response("<think>t</think> A plain caption.") == ("A plain caption.", "t")
    assert split_response("Just a caption.") == ("Just a caption.", None)
    assert split_response("<think>cut off") == ("", "cut off")
    assert split_response("<answer>no end") == ("no end", None)
