"""The conversion CLIs end to end, spawning their own conversion ranks (slow: process start-up)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.models.presets import save_tiny_hf_model_dir


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(file))
    return out


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
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
