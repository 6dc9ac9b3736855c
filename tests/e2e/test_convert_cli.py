"""The conversion CLIs end to end, spawning their own conversion ranks (slow: process start-up)."""

from __future__ import annotations

import pytest

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.models.presets import save_tiny_hf_model_dir
from tests.unit.test_convert import _bitwise_equal, _tensors


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_round_trip_at_tp2(tmp_path):
    """The CLIs end to end, spawning the TP=2 conversion ranks themselves."""
    src = save_tiny_hf_model_dir(tmp_path / "hf", "qwen2_5_vl", seed=9)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert (
        vcap_main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(ckpt), "--tp", "2"])
        == 0
    )
    assert vcap_main(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)]) == 0
    before, after = _tensors(src), _tensors(back)
    assert sorted(before) == sorted(after)
    assert all(_bitwise_equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_logits_tool_passes_and_fails(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from megatron_vcap.data.video_io import write_mp4
    from megatron_vcap.models.presets import synthetic_frames

    tool = Path(__file__).parents[2] / "tools" / "compare_logits.py"
    src = save_tiny_hf_model_dir(tmp_path / "hf", "qwen2_5_vl", seed=3)
    other = save_tiny_hf_model_dir(tmp_path / "other", "qwen2_5_vl", seed=4)
    frames = synthetic_frames(20, 84, 112, 1)
    video = write_mp4(tmp_path / "v.mp4", frames, fps=10, width=112, height=84)
    ckpt = tmp_path / "ckpt"
    assert vcap_main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(ckpt)]) == 0
    args = ["--ckpt", str(ckpt), "--video", str(video), "--fps", "3", "--prompt", "Describe."]

    def run(hf_dir):
        cmd = [sys.executable, str(tool), "--hf", str(hf_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    good = run(src)
    assert good.returncode == 0 and "OK: max abs diff" in good.stdout, good.stdout + good.stderr
    bad = run(other)  # another model's weights
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout + bad.stderr
