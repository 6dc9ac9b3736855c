"""``vcap train --config FILE [a.b=c ...]``: validate the config, then run GRPO or SFT.

Launch under ``torchrun`` or ``srun``; the config is validated (including the parallel layout
against the launcher's world size) before any process group exists.
"""

from __future__ import annotations

import sys


def run(args) -> int:
    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.parallel.launch_env import read_launch_env

    env = read_launch_env()
    cfg = load_job_config(args.config, args.overrides, world_size=env.world_size)
    if args.check:
        print(f"config OK: {args.config} (world size {env.world_size})")
        return 0
    try:
        from megatron_vcap.trainer.train import train_main
    except ModuleNotFoundError as exc:
        if exc.name != "megatron_vcap.trainer.train":
            raise
        print("vcap train: the trainer is not built yet in this build", file=sys.stderr)
        return 2
    return train_main(cfg)


def register(sub) -> None:
    p = sub.add_parser("train", help="GRPO or SFT training (torchrun / srun)")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo_cpu.yaml")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.group_size=8")
    p.set_defaults(func=run)
