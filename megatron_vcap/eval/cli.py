"""``vcap eval``: evaluation entry points.

* ``vcap eval reward`` scores greedy captions of a held-out manifest with the training rewards.
* ``vcap eval dream1k | carebench | vdc`` run a benchmark's published protocol: captions from a
  Megatron checkpoint (``--ckpt``, under torchrun / srun for several ranks) or made elsewhere
  (``--predictions``), judged on an OpenAI-compatible endpoint, aggregated as the benchmark does.
* ``vcap eval predict`` only generates the captions; ``vcap eval compare`` tabulates runs.
"""

from __future__ import annotations


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
    from megatron_vcap.config.loader import ConfigError
    from megatron_vcap.eval.run import run_benchmark as run

    if args.ckpt and not args.videos:
        raise ConfigError("--ckpt: generation needs --videos DIR")
    return run(args)


def run_predict(args) -> int:
    from megatron_vcap.eval.predict import predict_main

    return predict_main(args)


def run_compare(args) -> int:
    from megatron_vcap.eval.report import compare_table

    print(compare_table(args.dirs))
    return 0


def _temperature(text: str) -> float | None:
    return None if text.lower() in ("none", "default") else float(text)


def _data_args(p, bench: str, *, required: bool = True) -> None:
    if bench == "vdc":
        p.add_argument("--qa-dir", required=required, help="folder of the five VDC QA jsonl files")
        p.add_argument("--types", default=None, help="comma list (default: all five)")
        p.add_argument(
            "--prompt-pools",
            default=None,
            help="JSON {type: [instructions]} (the official pools ship with VDC's code)",
        )
    else:
        what = "DREAM-1k.jsonl" if bench == "dream1k" else "CAREBENCH JSON list"
        p.add_argument("--annotations", required=required, help=what)
    p.add_argument("--videos", default=None, help="folder the annotations' video names resolve in")
    p.add_argument(
        "--on-missing",
        choices=("stop", "skip"),
        default="stop",
        help="a missing video or caption: stop with the list (default) or skip and count it",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="only the first N samples (VDC: of each type)"
    )


def _generation_args(p) -> None:
    g = p.add_argument_group("generation (--ckpt)")
    g.add_argument("--config", default=None, help="job YAML (model / parallel / data / rollout)")
    g.add_argument("--frames", type=int, default=None, help="fixed frame count per video")
    g.add_argument("--fps", type=float, default=None)
    g.add_argument("--max-frames", type=int, default=None)
    g.add_argument("--max-pixels", type=int, default=None, help="pixels per frame")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="prompts generated together")
    g.add_argument(
        "--structured",
        action="store_true",
        help="prompt with the structured-thinking instruction instead of the benchmark's",
    )
    g.add_argument("overrides", nargs="*", help="section.key=value (model/parallel/data/rollout)")


def _judge_args(p) -> None:
    j = p.add_argument_group("judge")
    j.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL (.../v1)")
    j.add_argument("--judge-model", required=True)
    j.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="variable holding the key")
    j.add_argument("--judge-concurrency", type=int, default=32)
    j.add_argument("--judge-timeout", type=float, default=120.0)
    j.add_argument("--judge-retries", type=int, default=10, help="official: 10")
    j.add_argument("--judge-backoff", type=float, default=1.0)
    j.add_argument(
        "--judge-temperature",
        type=_temperature,
        default=0.0,
        help="default 0.0; 'none' sends no temperature (the API default, as DREAM-1K's script)",
    )
    j.add_argument("--judge-max-tokens", type=int, default=1024)
    j.add_argument("--judge-cache", default=None, help="answer cache (default OUT/judge_cache)")
    j.add_argument("--templates", default=None, help="folder of template files to use instead")
    j.add_argument("--max-items", type=int, default=10, help="AutoDQ items per caption")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluation: held-out rewards, DREAM-1K, VDC, CAREBENCH")
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
    names = {"dream1k": "DREAM-1K", "carebench": "CAREBENCH", "vdc": "VDC"}
    for bench, title in names.items():
        b = esub.add_parser(bench, help=f"{title} with its published protocol")
        _data_args(b, bench)
        src = b.add_mutually_exclusive_group(required=True)
        src.add_argument("--ckpt", default=None, help="Megatron checkpoint (training or converted)")
        src.add_argument("--predictions", default=None, help="captions made elsewhere (JSONL)")
        b.add_argument("--out", required=True, help="output folder")
        if bench == "vdc":
            b.add_argument(
                "--vdc-aggregation",
                choices=("official", "unbiased"),
                default="official",
                help="shown first: official drops zero-score videos, unbiased keeps them",
            )
        _judge_args(b)
        _generation_args(b)
        b.set_defaults(func=run_benchmark, benchmark=bench, predictions_only=False)
    pr = esub.add_parser("predict", help="only generate a benchmark's captions (--ckpt)")
    psub = pr.add_subparsers(dest="benchmark", metavar="BENCH")
    psub.required = True
    for bench, title in names.items():
        b = psub.add_parser(bench, help=f"{title} captions into OUT/predictions.jsonl")
        _data_args(b, bench)
        b.add_argument("--ckpt", required=True, help="Megatron checkpoint (training or converted)")
        b.add_argument("--out", required=True, help="output folder (predictions.jsonl)")
        b.add_argument("--templates", default=None, help="folder of template files to use instead")
        _generation_args(b)
        b.set_defaults(func=run_predict)
    c = esub.add_parser("compare", help="table of runs with deltas against the first")
    c.add_argument("dirs", nargs="+", help="--out folders (or folders of them)")
    c.set_defaults(func=run_compare)
