"""Resume across separate launches (slow): ``torchrun -m megatron_vcap train`` 4 GRPO steps
straight vs 2 steps, exit, relaunch to 4, on 2 gloo ranks. Weights (through ``mcore-to-hf``)
and per-step rollouts must be identical. The in-process variant runs in the default suite
(``tests/distributed/test_grpo_trainer.py``); this one also covers process restarts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vcap.parallel.multiprocess import find_free_port


def _launch(ws: dict, run_dir: Path, steps: int) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={find_free_port()}", "-m", "megatron_vcap", "train", "--config",
        ws["recipe"], f"model.hf_path={ws['model']}", f"data.train_manifest={ws['manifest']}",
        "train.mode=grpo", f"train.steps={steps}", f"train.run_dir={run_dir}",
        "grpo.group_size=4", "grpo.prompts_per_step=2", "rollout.max_new_tokens=24",
        "train.lr=1e-3", "checkpoint.save_interval=2", "data.num_workers=1",
        "reward.custom_fn=tests.distributed.test_grpo_trainer:toy_reward",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_resume_across_launches(tmp_path):
    from safetensors.torch import load_file

    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir, recipe_path

    data = make_synthetic_dataset(tmp_path / "data", 4, seed=2, width=64, height=48, fps=4,
                                  seconds=2)  # fmt: skip
    model = build_model_dir(tmp_path, data.tokenizer_dir, DemoSettings(hidden=64, layers=2))
    ws = {"recipe": str(recipe_path()), "model": str(model), "manifest": str(data.manifest)}
    _launch(ws, tmp_path / "straight", 4)
    _launch(ws, tmp_path / "resumed", 2)
    _launch(ws, tmp_path / "resumed", 4)

    weights = []
    for run in ("straight", "resumed"):
        out = convert_mcore_to_hf(tmp_path / run / "checkpoints/step_0000004",
                                  tmp_path / f"{run}_hf", progress=False)  # fmt: skip
        tensors = {}
        for shard in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        weights.append(tensors)
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), f"{name} differs after a relaunch"
    for rank in (0, 1):
        rows = [[(r["step"], r["sample_id"], r["response"], r["reward"])
                 for r in map(json.loads, (tmp_path / run / "rollouts" / f"dp_rank_{rank:03d}.jsonl")
                              .read_text().splitlines())]
                for run in ("straight", "resumed")]  # fmt: skip
        assert len(rows[0]) == 16 and rows[0] == rows[1]
