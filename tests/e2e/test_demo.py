"""End to end: ``vcap demo`` from the command line on a scaled-down setting (slow).

The default demo (the README's main command) takes ~5 minutes on 2 cores; this runs the same
stages — synthetic data, tiny model directory, SFT and GRPO under torchrun on 2 gloo ranks,
held-out evaluation of both checkpoints, table and reward curve — with fewer videos and steps.
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
            "2",
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
    assert (out / "grpo" / "rollouts" / "dp_rank_000.jsonl").is_file()
    assert (out / "sft" / "config.yaml").is_file()
