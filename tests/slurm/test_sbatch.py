"""The sbatch scripts of examples/slurm/ on a real local Slurm (``IMAGE=none``, 2 tasks, gloo,
a tiny Qwen2.5-VL-architecture model on synthetic videos):

* ``train_grpo.sbatch`` runs its steps (the straight run);
* the same job, ``scontrol requeue``d after its first logged step (SIGTERM to every task, as a
  preemption does): the trainer saves at a step boundary and exits 75, Slurm runs the job again,
  it resumes from that step and ends with the weights of the straight run, bit for bit;
* ``convert_mcore_to_hf.sbatch`` exports the requeued run's final checkpoint (compared tensor
  by tensor with the straight run's), ``convert_hf_to_mcore.sbatch`` converts the initial model
  (read back equal to its weights), ``eval.sbatch reward`` scores the trained checkpoint;
* ``judge_server.sbatch`` publishes its URL file (a stand-in server: vLLM needs GPUs);
* (slow) the time-limit USR1 sent to the batch shell: forwarded, saved, the job requeues itself.

``train_with_judge.sbatch`` (a heterogeneous job) is not run here: on this one-node cluster
sched/builtin refuses heterogeneous jobs, and under sched/backfill its two components stayed
PENDING (Resources) on the one node; it is linted (shellcheck) only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.workspace import tiny_grpo_workspace

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


def slow_toy_reward(response: str, request) -> float:
    """``reward.custom_fn`` of the training jobs: the toy reward, 0.5 s per sample (the
    samples of a rank are scored on ``reward.num_workers`` = 2 threads)."""
    from tests.distributed.test_grpo_trainer import toy_reward

    time.sleep(0.5)
    return toy_reward(response, request)


def _job_env() -> dict:
    return {
        "IMAGE": "none",
        "REPO": str(REPO),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _train_args(ws: dict, run_dir: Path) -> list[str]:
    from megatron_vcap.demo.demo import recipe_path

    return [
        str(recipe_path()),
        f"model.hf_path={ws['model']}",
        f"data.train_manifest={ws['manifest']}",
        "data.num_workers=1",
        "data.max_frames=4",
        "data.min_pixels=784",
        "data.max_pixels=3136",
        "rollout.max_new_tokens=16",
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        f"train.steps={STEPS}",
        "train.lr=1e-3",
        f"train.run_dir={run_dir}",
        "checkpoint.keep_last=8",
        # Steps of >= 1 s: a signal sent once step 1 is logged lands while steps remain.
        "reward.custom_fn=tests.slurm.test_sbatch:slow_toy_reward",
    ]


def _submit(slurm, ws, script: str, name: str, args: list[str], ntasks: int = 1) -> int:
    out = Path(ws["root"]) / f"{name}.out"
    return slurm.sbatch(
        [
            f"--job-name={name}",
            f"--output={out}",
            f"--ntasks-per-node={ntasks}",
            *CPU_JOB,
            str(REPO / "examples/slurm" / script),
            *args,
        ],  # fmt: skip
        cwd=REPO,
        env=_job_env(),
    )


def _log(ws, name: str, run_dir: Path | None = None) -> str:
    """The job's output, then (with ``run_dir``) the trainer's own log files (INFO records go
    there; the console is quiet)."""
    path = Path(ws["root"]) / f"{name}.out"
    text = path.read_text() if path.is_file() else ""
    if run_dir is not None:
        text += "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.log")))
    return text


def _assert_ok(slurm, ws, job: int, name: str, timeout: float) -> dict:
    info = slurm.wait(job, timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{name}: {info.get('JobState')} {info.get('ExitCode')}\n{_log(ws, name)[-6000:]}"
    )
    return info


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_grpo_workspace(tmp_path_factory.mktemp("sbatch"))


@pytest.fixture(scope="module")
def straight(slurm, workspace):
    """The uninterrupted GRPO job; its run directory."""
    run_dir = Path(workspace["root"]) / "straight"
    job = _submit(slurm, workspace, "train_grpo.sbatch", "straight",
                  _train_args(workspace, run_dir), ntasks=2)  # fmt: skip
    _assert_ok(slurm, workspace, job, "straight", 900)
    return run_dir


def _wait_for_step(path: Path, slurm, job: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return
        if slurm.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} ended before its first step: {slurm.job(job)}")
        time.sleep(0.2)
    raise TimeoutError(f"no step logged in {path} after {timeout} s")


@pytest.mark.timeout(2400)
def test_grpo_job_requeued_mid_run_resumes_exactly(slurm, workspace, straight):
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert "vcap sbatch: job" in _log(workspace, "straight")

    run_dir = Path(workspace["root"]) / "requeued"
    job = _submit(slurm, workspace, "train_grpo.sbatch", "requeued",
                  _train_args(workspace, run_dir), ntasks=2)  # fmt: skip
    _wait_for_step(run_dir / "metrics.jsonl", slurm, job, 900)
    slurm.scontrol("requeue", str(job))  # SIGTERM to the batch shell and every task
    t_signal = time.monotonic()
    # Slurm holds a requeued batch job for ~2 minutes (BeginTime); release it once pending.
    deadline = time.monotonic() + 300
    while slurm.job(job).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, slurm.job(job)
        time.sleep(0.2)
    t_pending = time.monotonic()
    slurm.scontrol("update", f"JobId={job}", "StartTime=now")
    info = _assert_ok(slurm, workspace, job, "requeued", 900)
    assert info["Restarts"] == "1", info

    log = _log(workspace, "requeued", run_dir)
    stops = re.findall(r"stopping at step (\d+) \(stop signal\).*?([\d.]+) s after SIGTERM", log)
    assert stops, log[-6000:]
    stop_step = int(stops[0][0])
    assert 1 <= stop_step < STEPS, stops
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert resumed and {int(s) for _, s in resumed} == {stop_step}, (resumed, log[-4000:])
    assert "exited with exit code 75" in log.lower() or "exit code 75" in log, log[-4000:]
    # Figures for the notes: signal -> the trainer's exit, and the step it resumed at.
    print(f"\nrequeue: stopped and saved at step {stop_step} ({stops[0][1]} s after SIGTERM in "
          f"the trainer); job pending {t_pending - t_signal:.1f} s after `scontrol requeue`; "
          f"resumed at step {stop_step}")  # fmt: skip
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps  # every step logged once

    # The requeued run's final checkpoint through the conversion job, the straight run's in
    # process: bit-identical weights.
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    root = Path(workspace["root"])
    job = _submit(slurm, workspace, "convert_mcore_to_hf.sbatch", "m2h",
                  [str(run_dir / f"checkpoints/step_{STEPS:07d}"), str(root / "hf_requeued")])  # fmt: skip
    _assert_ok(slurm, workspace, job, "m2h", 600)
    b = _hf_tensors(root / "hf_requeued")
    a = _hf_tensors(convert_mcore_to_hf(straight / f"checkpoints/step_{STEPS:07d}",
                                        root / "hf_straight", progress=False))  # fmt: skip
    initial = _hf_tensors(Path(workspace["model"]))
    assert set(a) == set(b) == set(initial)
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-4, "training moved nothing"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the requeue"


@pytest.mark.timeout(1800)
def test_conversion_and_eval_jobs(slurm, workspace, straight):
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_vcap.demo.demo import recipe_path

    root = Path(workspace["root"])
    job = _submit(slurm, workspace, "convert_hf_to_mcore.sbatch", "h2m",
                  [workspace["model"], str(root / "mcore")])  # fmt: skip
    _assert_ok(slurm, workspace, job, "h2m", 600)
    back = _hf_tensors(convert_mcore_to_hf(root / "mcore", root / "hf_back", progress=False))
    initial = _hf_tensors(Path(workspace["model"]))
    assert set(back) == set(initial)
    for name in initial:
        assert torch.equal(back[name], initial[name]), f"{name} changed in hf -> mcore -> hf"

    out = root / "eval.json"
    job = _submit(slurm, workspace, "eval.sbatch", "eval",
                  ["reward", "--config", str(recipe_path()), "--ckpt",
                   str(straight / f"checkpoints/step_{STEPS:07d}"), "--manifest",
                   workspace["manifest"], "--out", str(out), "--batch-size", "2",
                   "rollout.max_new_tokens=8", "data.max_frames=4", "data.min_pixels=784",
                   "data.max_pixels=3136"])  # fmt: skip
    _assert_ok(slurm, workspace, job, "eval", 600)
    result = json.loads(out.read_text())
    assert len(result["samples"]) == 4, result.keys()
    assert "summary" in result


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_time_limit_warning_saves_and_the_job_requeues_itself(slurm, workspace):
    """The USR1 that ``--signal=B:USR1@180`` sends the batch shell before the time limit
    (sent here at once with ``scancel --signal=USR1 --batch``): the script forwards it, the
    trainer saves and exits 75, the script requeues the job, which resumes and finishes."""
    run_dir = Path(workspace["root"]) / "usr1"
    args = [*_train_args(workspace, run_dir), "train.steps=5"]
    job = _submit(slurm, workspace, "train_grpo.sbatch", "usr1", args, ntasks=2)
    _wait_for_step(run_dir / "metrics.jsonl", slurm, job, 900)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm.env(), check=True)
    deadline = time.monotonic() + 600
    while not (slurm.job(job).get("JobState") == "PENDING" and slurm.job(job)["Restarts"] == "1"):
        assert time.monotonic() < deadline, (slurm.job(job), _log(workspace, "usr1")[-4000:])
        time.sleep(0.5)
    slurm.scontrol("update", f"JobId={job}", "StartTime=now")
    _assert_ok(slurm, workspace, job, "usr1", 900)
    log = _log(workspace, "usr1", run_dir)
    assert "vcap sbatch: USR1 at" in log and "requeueing job" in log, log[-4000:]
    stop = re.search(r"stopping at step (\d+) \(stop signal\).*s after SIGUSR1", log)
    assert stop, log[-4000:]
    assert re.search(rf"resumed from \S+step_0*{stop.group(1)} at step {stop.group(1)}", log)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5], steps


@pytest.mark.timeout(600)
def test_judge_server_job_publishes_its_url(slurm, workspace):
    """judge_server.sbatch with a stand-in server (JUDGE_CMD; vLLM needs GPUs): the URL file
    appears once the server answers, the trainer's judge.base_url_file wait resolves it, and
    the file is removed when the job is cancelled."""
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.rewards.config import JudgeConfig
    from megatron_vcap.trainer.judge_wait import wait_for_judge

    root = Path(workspace["root"])
    port = find_free_port()
    url_file = root / "judge" / "url"
    out = root / "judge.out"
    env = {**_job_env(), "JUDGE_IMAGE": "none", "JUDGE_PORT": str(port),
           "JUDGE_CMD": f"{sys.executable} -m http.server {port} --bind 0.0.0.0"}  # fmt: skip
    job = slurm.sbatch(["--job-name=judge", f"--output={out}", *CPU_JOB,
                        str(REPO / "examples/slurm/judge_server.sbatch"), "/models/none",
                        str(url_file)], cwd=REPO, env=env)  # fmt: skip
    cfg = JudgeConfig(kind="openai", base_url_file=str(url_file), wait_s=300)
    url = wait_for_judge(cfg, poll_s=0.5)
    assert url == f"http://{slurm.host}:{port}/v1", url
    subprocess.run(["scancel", str(job)], env=slurm.env(), check=True)
    slurm.wait(job, 120)
    deadline = time.monotonic() + 30
    while url_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not url_file.exists(), "a cancelled judge left its URL behind"
    assert "judge answers at" in out.read_text()
