"""``vcap train --config FILE [a.b=c ...]``: validate the job, then run GRPO or SFT.

Launch under ``torchrun`` or ``srun``. The whole job is validated (``config.job.validate_job``:
layout against the launcher's world size, batches, manifest, model folder, checkpoints, judge)
before any process group exists. ``--check`` runs exactly that validation and exits; give
``--world-size`` to check a layout from a login node, and ``--probe-judge`` to also send the
judge one request. The console shows rank 0's start-up summary and step lines; Megatron's and
the libraries' records go to ``<run_dir>/logs/rank_NNNNN.log`` (``--verbose`` prints them too).
"""

from __future__ import annotations


def run(args) -> int:
    from megatron_vcap.config.job import load_job_config, validate_job
    from megatron_vcap.parallel.launch_env import read_launch_env

    cfg = load_job_config(args.config, args.overrides)
    if args.check:
        world_size = args.world_size or read_launch_env().world_size
        check = validate_job(cfg, world_size, probe_judge=args.probe_judge)
        print(f"config OK: {args.config}\n{check.summary()}")
        from megatron_vcap.plan.cli import check_verdict

        print(check_verdict(cfg, world_size, args.gpu))
        return 0
    from megatron_vcap.trainer.train import train_main

    return train_main(cfg, probe_judge=args.probe_judge, verbose=args.verbose)


def register(sub) -> None:
    p = sub.add_parser("train", help="GRPO or SFT training (torchrun / srun)")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo_cpu.yaml")
    p.add_argument("--check", action="store_true", help="validate the whole job and exit")
    p.add_argument(
        "--world-size",
        type=int,
        help="with --check: the number of ranks to check the layout for "
        "(default: the launcher's, 1 outside torchrun/srun)",
    )
    p.add_argument(
        "--gpu",
        choices=("h100-80gb", "h200-141gb"),
        default="h100-80gb",
        help="with --check: the GPU the plan's memory verdict is for (vcap plan)",
    )
    p.add_argument(
        "--probe-judge", action="store_true", help="also send the judge one request first"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print every log record and Python warning of every rank (default: rank 0's "
        "summary, step lines and warnings; the rest goes to <run_dir>/logs/)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.group_size=8")
    p.set_defaults(func=run)
