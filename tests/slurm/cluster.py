"""A real one-node Slurm on localhost for the tests: munged, slurmctld and slurmd started from a
generated ``slurm.conf`` (non-default ports, state and spool in a temp dir) and stopped by PID.

Needs root and Debian's ``slurm-wlm`` + ``munge`` (``.ci/run`` installs them). ``missing()``
says why a cluster cannot start here; the tests skip with that reason, except under ``CI=true``.
Clients find this cluster through ``SLURM_CONF`` (see :meth:`LocalSlurm.env`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tools.gpu.common import descendants

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sacct", "scancel")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).is_file()), None
    )


def missing() -> str | None:
    """Why a local Slurm cannot run on this machine (None when it can)."""
    absent = [n for n in DAEMONS + CLIENTS[:4] if _which(n) is None]
    if absent:
        return f"Slurm/munge not installed (missing {', '.join(absent)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd and munged must run as root here"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, host: str, cpus: int) -> str:
    return f"""\
ClusterName=vcaptest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# backfill: heterogeneous jobs are only scheduled by it
SchedulerType=sched/backfill
ReturnToService=2
# Time between the SIGTERM of a preemption / requeue and the SIGKILL: the checkpoint's budget.
KillWait=120
MinJobAge=600
# Job ids pick the trainers' rendezvous port (launch_env: 20000 + id % 20000); a random first
# id keeps two test clusters on one machine off each other's ports.
FirstJobId={random.randint(1000, 19000)}
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop` (daemons killed by their PIDs)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname()
        self.procs: dict[str, int] = {}

    def env(self, **extra) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(_conf(self.root, self.host, os.cpu_count() or 1))
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        self._run(
            "munged",
            [
                _which("munged"),
                "--force",
                f"--socket={m}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],  # fmt: skip
            m / "munged.pid",
        )
        self._run(
            "slurmctld", [_which("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid"
        )
        self._run("slurmd", [_which("slurmd"), "-f", str(self.conf)], self.root / "slurmd.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env(), capture_output=True, text=True
            )
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"local Slurm not up after {timeout:.0f} s:\n{self.logs()}")

    def _run(self, name: str, cmd: list[str], pid_file: Path) -> None:
        # The daemons fork into the background and write their PID file when ready.
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"{name} failed to start: {proc.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + 20
        while not pid_file.is_file() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} wrote no PID file {pid_file}\n{self.logs()}")
            time.sleep(0.1)
        self.procs[name] = int(pid_file.read_text().split()[0])

    def logs(self) -> str:
        parts = []
        for f in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            p = self.root / f
            if p.is_file():
                parts.append(f"--- {p}\n" + "\n".join(p.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if "slurmctld" in self.procs:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env(), timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = subprocess.run(["squeue", "-h"], env=self.env(), capture_output=True,
                                     text=True, timeout=30)  # fmt: skip
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        # Job step daemons (slurmstepd) and whatever still runs under them outlive slurmd.
        leftovers = descendants(self.procs["slurmd"]) if "slurmd" in self.procs else []
        for name in reversed(list(self.procs)):
            pid = self.procs.pop(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # -- job helpers ---------------------------------------------------------------------------
    def sbatch(self, args: list[str], *, cwd: Path, env: dict | None = None) -> int:
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job_id)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        fields = {}
        for token in out.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: int, timeout: float, *, states=("COMPLETED", "FAILED", "CANCELLED",
             "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> dict:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {self.job(job_id)}")

    def scontrol(self, *args: str) -> str:
        out = subprocess.run(
            ["scontrol", *args], env=self.env(), capture_output=True, text=True, timeout=30
        )
        if out.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of a daemon we did not parent still answers kill 0; /proc tells.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
