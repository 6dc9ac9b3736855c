"""End to end: ``vcap demo`` from the command line on a scaled-down setting (slow).

The default demo (the README's main command) takes 6-7 minutes on 2 idle cores; this runs
the same stages — synthetic data, tiny model directory, SFT and GRPO under torchrun on 2 gloo ranks,
held-out evaluation of both checkpoints, the Hugging Face export (loaded back with transformers
and generating on a held-out video), table, trend and plot — with fewer videos and steps.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_vcap_demo_small(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_vcap",
            "demo",
            "--out",
            str(out),
            "--num-train",
            "8",
            "--num-eval",
            "4",
            "--sft-steps",
            "4",
            "--grpo-steps",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=1100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out (greedy)" in proc.stdout and "SFT + GRPO" in proc.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    for name in ("sft", "grpo"):
        assert summary[name]["num_samples"] == 4
        assert 0.0 <= summary[name]["total"] <= 3.0
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert f"plot: {out / 'reward_curve.png'}" in proc.stdout
    # The training trend table: one line per component, with its z statistic.
    assert "training reward" in proc.stdout and "z: change / its standard error" in proc.stdout
    trend = summary["training_trend"]["total"]
    assert (
        trend["quarter_steps"] == 2 and abs(trend["diff"] - (trend["last"] - trend["first"])) < 1e-9
    )
    # The GRPO result exported to Hugging Face format generates with transformers alone.
    hf_dir = out / "hf"
    assert (hf_dir / "processor_config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    from megatron_vcap.data.manifest import load_manifest
    from megatron_vcap.data.prompts import STRUCTURED_THINKING_INSTRUCTION
    from megatron_vcap.data.vision import process_video
    from tests.unit.test_hf_export import hf_generate_on_video

    sample = load_manifest(out / "data" / "eval.jsonl")[0]
    video = process_video(sample.video, fps=2.0, max_frames=8, min_pixels=3136, max_pixels=9408)
    _, new_ids = hf_generate_on_video(
        hf_dir, sample.video, video, STRUCTURED_THINKING_INSTRUCTION, max_new_tokens=16
    )
    assert new_ids.numel() >= 1
    assert (out / "grpo" / "rollouts" / "dp_rank_000.jsonl").is_file()
    assert (out / "sft" / "config.yaml").is_file()
