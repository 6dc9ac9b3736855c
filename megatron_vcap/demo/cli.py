"""``vcap demo [--out DIR]``: the CPU demo (see ``demo/demo.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args) -> int:
    from megatron_vcap.demo.demo import DemoSettings, run_demo

    settings = DemoSettings(
        num_train=args.num_train,
        num_eval=args.num_eval,
        sft_steps=args.sft_steps,
        grpo_steps=args.grpo_steps,
        grpo_lr=args.grpo_lr,
        grpo_warmup_steps=args.grpo_warmup_steps,
        grpo_temperature=args.grpo_temperature,
        greedy_anchor=args.greedy_anchor,
        nproc=args.nproc,
        seed=args.seed,
    )
    run_demo(Path(args.out), settings)
    return 0


def register(sub) -> None:
    from megatron_vcap.demo.demo import DemoSettings

    d = DemoSettings()
    p = sub.add_parser("demo", help="CPU demo: synthetic videos, tiny model, SFT then GRPO, eval")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-eval", type=int, default=d.num_eval)
    p.add_argument("--sft-steps", type=int, default=d.sft_steps)
    p.add_argument("--grpo-steps", type=int, default=d.grpo_steps)
    p.add_argument(
        "--grpo-lr",
        type=float,
        default=d.grpo_lr,
        help=f"learning rate of the GRPO stage (default {d.grpo_lr:g})",
    )
    p.add_argument(
        "--grpo-warmup-steps",
        type=int,
        default=d.grpo_warmup_steps,
        help=f"linear learning-rate warmup of the GRPO stage, at most a quarter of its steps "
        f"(default {d.grpo_warmup_steps})",
    )
    p.add_argument(
        "--grpo-temperature",
        type=float,
        default=d.grpo_temperature,
        help=f"rollout temperature of the GRPO stage (default {d.grpo_temperature})",
    )
    p.add_argument(
        "--greedy-anchor",
        action=argparse.BooleanOptionalAction,
        default=d.greedy_anchor,
        help="decode one sample of each GRPO group greedily (grpo.greedy_anchor; default "
        f"{'on' if d.greedy_anchor else 'off'})",
    )
    p.add_argument("--nproc", type=int, default=d.nproc, help="gloo ranks per stage")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)
