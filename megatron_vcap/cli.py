"""The ``vcap`` command line: one subcommand per area, each defined next to the code it drives.

Each area module exposes ``register(subparsers)``, adding its parser with ``func`` set to the
handler (``handler(args) -> int``). Modules are imported when the top-level parser is built, so
they must keep heavy imports (torch, megatron) inside their handlers. User and config mistakes
(``ConfigError`` / ``ValueError`` subclasses marked user-facing) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megatron_vcap.config.loader import ConfigError

# Subcommand -> module that registers it. Order is the order shown in --help.
COMMAND_MODULES = {
    "env": "megatron_vcap.env_report",
    "train": "megatron_vcap.trainer.cli",
    "demo": "megatron_vcap.demo.cli",
    "convert": "megatron_vcap.convert.cli",
    "data": "megatron_vcap.data.cli",
    "reward": "megatron_vcap.rewards.cli",
    "eval": "megatron_vcap.eval.cli",
    "plan": "megatron_vcap.plan.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcap", description="megatron_vcap: GRPO post-training of Qwen-VL video captioners"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMAND_MODULES.values():
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"vcap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
