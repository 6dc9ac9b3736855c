"""Rank / world / master address from the launcher: torchrun's variables or Slurm's.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under
``srun python -m ...`` only Slurm's variables exist: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
and SLURM_NODELIST (compressed host list, e.g. ``gpu[01-04,07],login1``), whose first host is
the rendezvous master.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_vcap.config.loader import ConfigError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``'gpu[01-03,07],cpu5'`` -> ``['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']``.

    Supports one bracketed range group per host name (what Slurm emits); zero padding is kept.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                    raise ConfigError(f"SLURM_NODELIST: bad range '{part}' in '{nodelist}'")
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    if not hosts:
        raise ConfigError(f"SLURM_NODELIST: no hosts in '{nodelist}'")
    return hosts


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from None


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Detect the launcher; torchrun's variables win over Slurm's when both are present."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            master = env["MASTER_ADDR"]
        elif "SLURM_NODELIST" in env or "SLURM_JOB_NODELIST" in env:
            master = expand_slurm_nodelist(env.get("SLURM_NODELIST") or env["SLURM_JOB_NODELIST"])[
                0
            ]
        else:
            master = "127.0.0.1"
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            # Distinct jobs sharing a node must not collide on the rendezvous port.
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=master,
            master_port=port,
            source="slurm",
        )
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
