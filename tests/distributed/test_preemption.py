"""Preemption on 2 gloo ranks: a stop signal mid-step -> both ranks save at the same step
boundary and leave with exit code 75; the resumed run ends with the weights of a straight run.

One spawn, three ``train_main`` calls on a tiny Qwen2.5-VL-architecture model:

* straight: 3 GRPO steps;
* interrupted: the reward function of rank 0 sends its own process SIGTERM during step 0, and
  every checkpoint save sends SIGTERM + SIGUSR1 to its process as it starts and SIGTERM again
  0.3 s in (while Megatron's writer processes run): both ranks must stop after step 1 with one
  complete checkpoint, the writer's helper processes surviving the signals;
* resumed: from that checkpoint to step 3, which must equal the straight run bit for bit.

The Slurm variant (``tests/slurm/``) sends the signal from ``scontrol requeue``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from megatron_vcap.parallel.multiprocess import run_on_ranks
from tests.distributed.test_grpo_trainer import _hf_tensors, recipe_path
from tests.workspace import tiny_grpo_workspace

_FIRE = threading.Event()


def signalling_reward(response: str, request) -> float:
    """``reward.custom_fn``: the dense toy reward; on rank 0 it also sends SIGTERM once."""
    from tests.distributed.test_grpo_trainer import toy_reward

    if _FIRE.is_set() and os.environ.get("RANK") == "0":
        _FIRE.clear()
        os.kill(os.getpid(), signal.SIGTERM)
    return toy_reward(response, request)


def _overrides(ws: dict, run_dir: Path, steps: int) -> list[str]:
    return [
        f"model.hf_path={ws['model']}",
        f"data.train_manifest={ws['manifest']}",
        "data.num_workers=1",  # a worker process: it must survive the signals too
        "data.max_frames=4",
        "data.min_pixels=784",
        "data.max_pixels=3136",
        "rollout.max_new_tokens=16",
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        "train.mode=grpo",
        f"train.steps={steps}",
        "train.lr=1e-3",
        f"train.run_dir={run_dir}",
        "checkpoint.load=auto",
        "checkpoint.save_interval=0",
        "reward.custom_fn=tests.distributed.test_preemption:signalling_reward",
    ]


def _signalling_save(original):
    def save(self, step, bundle, **kwargs):
        me = os.getpid()
        os.kill(me, signal.SIGTERM)
        os.kill(me, signal.SIGUSR1)
        late = threading.Timer(0.3, os.kill, (me, signal.SIGTERM))
        late.start()
        try:
            return original(self, step, bundle, **kwargs)
        finally:
            late.join()

    return save


def _runs(ws: dict) -> dict:
    import torch.distributed as dist

    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.trainer.checkpointing import CheckpointManager
    from megatron_vcap.trainer.train import train_main

    # One process group for the three runs (as under one launcher): re-creating the default
    # group on the same rendezvous port between runs is not what is tested here.
    dist.init_process_group("gloo")
    root = Path(ws["root"])
    codes = {}
    codes["straight"] = train_main(load_job_config(recipe_path(), _overrides(ws, root / "s", 3)))
    original = CheckpointManager.save
    CheckpointManager.save = _signalling_save(original)
    _FIRE.set()
    try:
        cfg = load_job_config(recipe_path(), _overrides(ws, root / "p", 3))
        codes["interrupted"] = train_main(cfg)
    finally:
        CheckpointManager.save = original
    saved = sorted((root / "p/checkpoints").glob("step_*"))
    codes["saved"] = [p.name for p in saved]
    codes["meta"] = json.loads((saved[-1] / "vcap_checkpoint.json").read_text()) if saved else {}
    codes["resumed"] = train_main(load_job_config(recipe_path(), _overrides(ws, root / "p", 3)))
    # The default actions are back once the trainer has returned.
    codes["handler"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    return codes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_grpo_workspace(tmp_path_factory.mktemp("preemption"))


@pytest.mark.timeout(900)
def test_signal_saves_at_step_boundary_and_resume_is_exact(workspace):
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    codes = run_on_ranks(_runs, 2, workspace, timeout=850)
    root = Path(workspace["root"])
    for rank_codes in codes:
        assert rank_codes["straight"] == 0 and rank_codes["resumed"] == 0, rank_codes
        assert rank_codes["interrupted"] == 75, rank_codes
        assert rank_codes["handler"], "SIGTERM's default action was not restored"
    # Rank 0 was signalled during step 0 only: both ranks stopped at the boundary after step 1.
    assert codes[0]["saved"] == ["step_0000001"], codes[0]["saved"]
    assert codes[0]["meta"]["step"] == 1 and codes[0]["meta"]["world_size"] == 2
    log_steps = [json.loads(x)["step"] for x in (root / "p/metrics.jsonl").read_text().splitlines()]
    assert log_steps == [1, 2, 3], log_steps  # step 1 once, then the resumed steps 2 and 3

    initial = _hf_tensors(Path(workspace["model"]))
    straight = _hf_tensors(
        convert_mcore_to_hf(root / "s/checkpoints/step_0000003", root / "hf_s", progress=False)
    )
    resumed = _hf_tensors(
        convert_mcore_to_hf(root / "p/checkpoints/step_0000003", root / "hf_p", progress=False)
    )
    assert max(float((straight[k] - initial[k]).abs().max()) for k in straight) > 1e-4
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{name} differs after preemption"
