"""Launcher detection: torchrun's and Slurm's variables, Slurm node-list expansion."""

import pytest

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.parallel.launch_env import expand_slurm_nodelist, read_launch_env


def test_expand_nodelist():
    assert expand_slurm_nodelist("gpu[01-03,07],login1") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login1",
    ]
    assert expand_slurm_nodelist("node5") == ["node5"]
    assert expand_slurm_nodelist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]
    with pytest.raises(ConfigError, match="bad range"):
        expand_slurm_nodelist("gpu[09-02]")


def test_torchrun_env():
    env = read_launch_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "3",
            "MASTER_ADDR": "host0",
            "MASTER_PORT": "1234",
        }
    )
    assert (
        env.rank,
        env.world_size,
        env.local_rank,
        env.master_addr,
        env.master_port,
        env.source,
    ) == (3, 8, 3, "host0", 1234, "torchrun")


def test_slurm_env():
    env = read_launch_env(
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_NODELIST": "dgx[003-004]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "dgx003")
    assert env.source == "slurm" and 20000 <= env.master_port < 40000
    # torchrun's variables take precedence when srun launches torchrun.
    env = read_launch_env(
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "4"}
    )
    assert env.source == "torchrun" and env.rank == 1
    with pytest.raises(ConfigError, match="SLURM_PROCID"):
        read_launch_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})


def test_single_process_default():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")
