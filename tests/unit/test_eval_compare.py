"""``vcap eval compare``: the paper's table shape (rows: runs; columns: DREAM F1, VDC accuracy,
CARE action / object F1) with deltas against the first run."""

from __future__ import annotations

import json

from megatron_vcap.cli import main as vcap_main


def _write(d, bench, **res):
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({"benchmark": bench, **res}))


def prf(f1):
    return {"f1": f1, "precision": f1, "recall": f1, "n": 1}


def test_compare_table_with_deltas(tmp_path, capsys):
    base, rl = tmp_path / "qwen2vl", tmp_path / "videocap_r1"
    _write(base / "dream", "dream1k", overall=prf(0.296))
    _write(base / "vdc", "vdc", average={"accuracy": 0.416, "score": 2.16})
    _write(base / "care", "carebench", action={"overall": prf(0.288)},
           object={"overall": prf(0.240)})  # fmt: skip
    _write(rl / "dream", "dream1k", overall=prf(0.342))
    _write(rl / "care", "carebench", action={"overall": prf(0.319)},
           object={"overall": prf(0.309)})  # fmt: skip
    assert vcap_main(["eval", "compare", str(base), str(rl)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "DREAM F1" in lines[0] and "CARE object F1" in lines[0]
    first = lines[2].split()
    assert first == ["qwen2vl", "29.6", "41.6", "28.8", "24.0"]
    second = lines[3].split()
    assert second == ["videocap_r1", "34.2", "(+4.6)", "-", "31.9", "(+3.1)", "30.9", "(+6.9)"]


def test_compare_names_a_folder_without_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert vcap_main(["eval", "compare", str(tmp_path / "empty")]) == 2
    assert "holds no results.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{}")
    assert vcap_main(["eval", "compare", str(bad)]) == 2
    assert "not a results.json of vcap eval" in capsys.readouterr().err
