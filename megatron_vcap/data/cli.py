"""``vcap data``: dataset tools — ``synth`` (synthetic videos + manifest + tiny tokenizer),
``validate`` (check every manifest line) and ``annotate`` (judge-built structures; it lives in
``megatron_vcap/rewards/annotate.py`` and is registered here).

Heavy imports (torch, decoders) stay inside the handlers so ``vcap --help`` stays fast.
"""

from __future__ import annotations

import os
import sys

from megatron_vcap.config.loader import ConfigError


def _synth(args) -> int:
    from megatron_vcap.data.synth import make_synthetic_dataset

    try:
        paths = make_synthetic_dataset(
            args.out,
            args.num_videos,
            args.seed,
            width=args.width,
            height=args.height,
            fps=args.fps,
            seconds=args.seconds,
            eval_fraction=args.eval_fraction,
            write_tokenizer=not args.no_tokenizer,
            show_progress=True,
            workers=args.workers,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.num_videos} videos to {paths.videos_dir}")
    print(f"manifest: {paths.manifest}")
    if paths.train_manifest:
        print(f"train / eval manifests: {paths.train_manifest}, {paths.eval_manifest}")
    if paths.tokenizer_dir:
        print(f"tokenizer: {paths.tokenizer_dir}")
    return 0


def _data_config(args):
    """The data section: --config's, then --backend, then data.* overrides (as in vcap train)."""
    from megatron_vcap.config.job import load_job_sections

    cfg = load_job_sections(
        args.config,
        args.overrides,
        sections=("data",),
        command="vcap data validate",
        flags={"data.video_backend": args.backend},
    )
    return cfg.data


def _validate(args) -> int:
    from megatron_vcap.data.manifest import ManifestError
    from megatron_vcap.data.validate import validate_manifest

    cfg = _data_config(args)
    try:
        report = validate_manifest(
            args.manifest,
            cfg,
            decode=not args.no_decode,
            full_decode=args.full_decode,
            workers=args.workers,
            show_progress=True,
        )
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="dataset tools: synth, validate, annotate",
        description="Dataset tools: synthetic data, manifest validation, annotation.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("synth", help="write synthetic MP4 videos, a manifest and a tiny tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-videos", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="also write train.jsonl / eval.jsonl with this share held out for evaluation",
    )
    p.add_argument("--no-tokenizer", action="store_true", help="skip writing tokenizer/")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes rendering and encoding videos (default: the CPU count); the output does "
        "not depend on it",
    )
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "validate",
        help="check every manifest line (JSON, fields, file, decoding); exit 1 if any is bad",
    )
    p.add_argument("manifest")
    p.add_argument("--config", help="job YAML whose 'data' section sets decoding / sampling")
    p.add_argument("--backend", choices=["pyav", "decord"], help="override data.video_backend")
    p.add_argument("--no-decode", action="store_true", help="check JSON, fields and files only")
    p.add_argument("--full-decode", action="store_true", help="also decode every frame")
    p.add_argument("--workers", type=int, default=1, help="decode in this many processes")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="data.* overrides as in vcap train, e.g. data.max_frames=16",
    )
    p.set_defaults(func=_validate)

    from megatron_vcap.rewards.annotate import add_annotate_parser

    add_annotate_parser(sub)
