"""GPU checks of the trainer (skipped without CUDA): GRPO and SFT steps with Transformer Engine
layers in bf16, and FP8 on H100-class GPUs (compute capability >= 8.9).

    python -m pytest -m gpu tests/gpu/test_trainer_gpu.py

Each case launches ``torchrun -m megatron_vcap train`` on one GPU with a tiny random
Qwen2.5-VL-architecture model on synthetic videos, then checks the step metrics are finite, the
update moved the weights and the final checkpoint converts to Hugging Face tensors.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vcap.parallel.multiprocess import find_free_port

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir

    root = tmp_path_factory.mktemp("trainer_gpu")
    data = make_synthetic_dataset(root / "data", 8, seed=1, width=112, height=84, fps=4,
                                  seconds=2)  # fmt: skip
    model = build_model_dir(root, data.tokenizer_dir, DemoSettings(hidden=128, layers=2))
    return root, model, data.manifest


def _train(root: Path, model: Path, manifest: Path, name: str, *overrides) -> Path:
    from megatron_vcap.demo.demo import recipe_path

    run_dir = root / name
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
        f"--master-port={find_free_port()}", "-m", "megatron_vcap", "train", "--config",
        str(recipe_path()), f"model.hf_path={model}", f"data.train_manifest={manifest}",
        f"train.run_dir={run_dir}", "model.params_dtype=bf16", "model.transformer_impl=auto",
        "parallel.backend=nccl", "train.steps=2", "train.lr=1e-4", "grpo.prompts_per_step=2",
        "grpo.group_size=4", "rollout.max_new_tokens=32", "data.num_workers=1",
        "reward.custom_fn=tests.distributed.test_grpo_trainer:toy_reward", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    return run_dir / "checkpoints" / "step_0000002"


def _check_checkpoint(ckpt: Path, out: Path) -> None:
    from safetensors.torch import load_file

    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    hf = convert_mcore_to_hf(ckpt, out, progress=False)
    tensors = {}
    for shard in hf.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    assert len(tensors) > 20 and all(torch.isfinite(t.float()).all() for t in tensors.values())


@pytest.mark.parametrize("mode", ["grpo", "sft"])
def test_bf16_te_training_steps(workspace, mode):
    root, model, manifest = workspace
    ckpt = _train(root, model, manifest, f"bf16_{mode}", f"train.mode={mode}",
                  "train.global_batch_size=4", "train.micro_batch_size=2")  # fmt: skip
    _check_checkpoint(ckpt, root / f"bf16_{mode}_hf")


def test_fp8_grpo_steps(workspace):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (H100)")
    pytest.importorskip("transformer_engine")
    root, model, manifest = workspace
    ckpt = _train(root, model, manifest, "fp8_grpo", "train.mode=grpo", "model.fp8=hybrid",
                  "train.micro_batch_size=4")  # fmt: skip
    _check_checkpoint(ckpt, root / "fp8_grpo_hf")
