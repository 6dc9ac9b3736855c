"""The demo's report: the training-reward trend statistic, the moving average and the plot.

Expected values are worked out by hand in the tests.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_vcap.demo.demo import (
    DemoSettings,
    claim_out_dir,
    compute_trend,
    format_trends,
    load_reward_series,
    moving_average,
    reward_curve_png,
)


def test_trend_by_hand():
    # 8 steps: quarters of 2. First [1, 3] (mean 2, var 2), last [4, 6] (mean 5, var 2).
    t = compute_trend([1, 3, 9, 9, 0, 0, 4, 6])
    assert t["quarter_steps"] == 2
    assert t["first"] == 2 and t["last"] == 5 and t["diff"] == 3
    assert t["se"] == pytest.approx(math.sqrt(2 / 2 + 2 / 2))
    assert t["z"] == pytest.approx(3 / math.sqrt(2))
    # 9 values: quarters of 2 (the middle absorbs the remainder).
    assert compute_trend([1, 3, 0, 0, 0, 0, 0, 4, 6])["diff"] == 3
    assert math.isnan(compute_trend([1, 2, 3])["z"])  # too short for a variance


def test_moving_average_by_hand():
    assert moving_average([2, 4, 6, 8], 2) == [2, 3, 5, 7]
    assert moving_average([3, 3, 9], 5) == [3, 3, 5]


def test_plot_and_trend_table_from_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = []
    for step in range(1, 21):
        rows.append({"step": step, "reward/total_mean": 1 + step / 20,
                     "reward/format_mean": 0.8, "reward/think_mean": 0.1 + (step % 3) / 100,
                     "reward/caption_mean": 0.2 + step / 40})  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = load_reward_series(metrics)
    assert series["step"] == list(range(1, 21)) and series["format"] == [0.8] * 20
    scores = {"format": 1.0, "think": 0.2, "caption": 0.1, "total": 1.3}
    png = tmp_path / "curve.png"
    reward_curve_png(metrics, png, scores, {**scores, "total": 1.5})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = format_trends({k: compute_trend(v) for k, v in series.items() if k != "step"})
    total_line = next(line for line in table.splitlines() if line.startswith("total"))
    # First quarter steps 1-5: mean 1.15; last 16-20: mean 1.90.
    assert "1.150" in total_line and "1.900" in total_line and "+0.750" in total_line


def test_a_rerun_resumes_and_other_settings_start_afresh(tmp_path, capsys):
    out = tmp_path / "demo"
    assert claim_out_dir(out, DemoSettings(seed=1)) is False  # new directory
    (out / "sft" / "checkpoints").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert claim_out_dir(out, DemoSettings(seed=1)) is False  # same settings: resume
    assert (out / "sft" / "checkpoints").is_dir()
    assert claim_out_dir(out, DemoSettings(seed=2)) is True  # another seed: stale checkpoints
    assert not (out / "sft").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the demo's own outputs go
    assert "starting afresh" in capsys.readouterr().out
    assert json.loads((out / "demo_settings.json").read_text())["seed"] == 2
    # A run from before settings were recorded counts as other settings.
    (out / "demo_settings.json").unlink()
    (out / "grpo").mkdir()
    assert claim_out_dir(out, DemoSettings(seed=2)) is True
