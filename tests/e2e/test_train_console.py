"""What ``vcap train`` prints: by default rank 0's start-up summary and step lines and no Python
warnings; Megatron's and the libraries' records (their import-time warnings included) go to
``<run_dir>/logs/``. ``--verbose`` brings them back to the console.

Real launches: ``torchrun -m megatron_vcap train`` on 2 gloo ranks for one GRPO step, then a
one-process ``--verbose`` relaunch that resumes it for a second step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vcap.parallel.multiprocess import find_free_port

# A Python warning as the warnings module prints it ("file:line: UserWarning: ...").
PY_WARNING = re.compile(r"\b\w*Warning: ")
MEGATRON_IMPORT_WARNING = "Transformer Engine and Apex are not installed"


def _launch(ws: dict, steps: int, *, nproc: int, verbose: bool) -> str:
    prefix = [sys.executable, "-m"]
    if nproc > 1:
        prefix += ["torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={find_free_port()}", "-m"]  # fmt: skip
    cmd = [
        *prefix, "megatron_vcap", "train", "--config", ws["recipe"],
        *(["--verbose"] if verbose else []),
        f"model.hf_path={ws['model']}", f"data.train_manifest={ws['manifest']}",
        "train.mode=grpo", f"train.steps={steps}", f"train.run_dir={ws['run_dir']}",
        "grpo.group_size=2", f"grpo.prompts_per_step={nproc}", "rollout.max_new_tokens=8",
        "data.num_workers=0", "data.max_frames=4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    return console


@pytest.mark.timeout(900)
def test_default_console_is_quiet_and_verbose_brings_the_records_back(tmp_path):
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir, recipe_path

    data = make_synthetic_dataset(tmp_path / "data", 2, seed=1, width=64, height=48, fps=4,
                                  seconds=2)  # fmt: skip
    model = build_model_dir(tmp_path, data.tokenizer_dir, DemoSettings(hidden=64, layers=2))
    run_dir = tmp_path / "run"
    ws = {"recipe": str(recipe_path()), "model": str(model), "manifest": str(data.manifest),
          "run_dir": str(run_dir)}  # fmt: skip

    quiet = _launch(ws, 1, nproc=2, verbose=False)
    assert not PY_WARNING.search(quiet), quiet
    assert "Params for bucket" not in quiet and MEGATRON_IMPORT_WARNING not in quiet
    assert "No CUDA runtime is found" not in quiet  # torch's own stderr handler, swapped too
    # One summary and one step line: rank 0 only.
    assert quiet.count("[vcap] layout: TP1 x PP1 x DP2 on 2 rank(s)") == 1, quiet
    assert quiet.count("[vcap] model: ") == 1 and "M parameters" in quiet
    assert "[vcap] data: " in quiet and "(2 samples)" in quiet
    assert "[vcap] judge: embedded" in quiet
    assert len(re.findall(r"^\[grpo\] step 1 ", quiet, re.M)) == 1, quiet
    logs = {r: (run_dir / "logs" / f"rank_{r:05d}.log").read_text() for r in (0, 1)}
    for text in logs.values():  # the records are kept, not dropped
        assert MEGATRON_IMPORT_WARNING in text

    verbose = _launch(ws, 2, nproc=1, verbose=True)
    assert MEGATRON_IMPORT_WARNING in verbose and PY_WARNING.search(verbose)
    # The resumed run's own warning (a longer schedule) reaches the console in both modes.
    assert "train.steps 1 -> 2" in verbose
    assert re.search(r"^\[grpo\] step 2 ", verbose, re.M) and "[grpo] step 1 " not in verbose
