"""``vcap eval``: evaluation entry points.

``vcap eval reward`` scores greedy captions of a held-out manifest with the training rewards.
The benchmark protocols (DREAM-1K, VDC, CAREBENCH) are not built yet and say so.
"""

from __future__ import annotations

import sys


def run_reward(args) -> int:
    from pathlib import Path

    from megatron_vcap.config.job import load_job_config, validate_job
    from megatron_vcap.eval.reward_eval import evaluate_main
    from megatron_vcap.parallel.launch_env import read_launch_env

    env = read_launch_env()
    cfg = load_job_config(args.config, args.overrides)
    hf_dir = Path(args.ckpt) / "hf"
    validate_job(cfg, env.world_size, mode="eval", model_dir=hf_dir, manifest=args.manifest)
    summary = evaluate_main(cfg, args.ckpt, args.manifest, args.out, batch_size=args.batch_size)
    if env.rank == 0:
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
            )
        )
    return 0


def run_benchmark(args) -> int:
    print(f"vcap eval {args.benchmark}: benchmark evaluation is not built yet", file=sys.stderr)
    return 2


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluation: held-out rewards (DREAM-1K/VDC/CAREBENCH pending)")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL")
    esub.required = True
    r = esub.add_parser("reward", help="greedy captions of a manifest scored by the rewards")
    r.add_argument("--config", required=True)
    r.add_argument("--ckpt", required=True, help="checkpoint directory (with hf/)")
    r.add_argument("--manifest", required=True)
    r.add_argument("--out", required=True, help="results JSON")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=run_reward)
    for name in ("dream1k", "vdc", "carebench"):
        b = esub.add_parser(name, help=f"{name} protocol (not built yet)")
        b.add_argument("rest", nargs="*")
        b.set_defaults(func=run_benchmark, benchmark=name)
