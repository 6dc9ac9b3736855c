"""``vcap reward score``: score a file of model responses offline with the training rewards.

    vcap reward score --manifest M --responses R.jsonl --out S.jsonl \
        [--judge embedded|openai --judge-url URL --judge-model NAME --judge-key-env VAR ...] \
        [--backend lexical|embedding] [--config job.yaml] [reward.KEY=VALUE judge.KEY=VALUE ...]

Each line of R.jsonl is ``{"id": <manifest sample id>, "response": <model output>}`` (several
responses may share a sample id). S.jsonl gets one line per response, in input order, with every
component, the total and any parse / judge failure reason; a summary follows on stdout (and in
``S.summary.json``). Researchers use it to inspect reward behaviour on real outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rewards.config import JudgeConfig, RewardConfig


def add_judge_arguments(p: argparse.ArgumentParser) -> None:
    """Judge selection flags shared by ``reward score`` and ``data annotate``."""
    g = p.add_argument_group("judge")
    g.add_argument("--judge", choices=["embedded", "openai"], help="judge kind (judge.kind)")
    g.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    g.add_argument("--judge-model", help="model name served at --judge-url")
    g.add_argument("--judge-key-env", help="NAME of the environment variable holding the API key")
    g.add_argument("--judge-concurrency", type=int, help="requests in flight")
    g.add_argument("--judge-timeout", type=float, help="seconds per request")
    g.add_argument("--judge-retries", type=int, help="retries per request")
    g.add_argument("--judge-cache", help="directory of the on-disk answer cache")
    p.add_argument("--config", help="job YAML whose reward: and judge: sections are used")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="reward.* / judge.* overrides as in vcap train, e.g. judge.max_events=8",
    )


_JUDGE_FLAGS = {
    "judge": "kind",
    "judge_url": "base_url",
    "judge_model": "model",
    "judge_key_env": "api_key_env",
    "judge_concurrency": "concurrency",
    "judge_timeout": "timeout_s",
    "judge_retries": "max_retries",
    "judge_cache": "cache_dir",
}


def build_configs(args: argparse.Namespace) -> tuple[RewardConfig, JudgeConfig]:
    """Reward and judge configs: --config's sections, the flags, then overrides (last wins)."""
    from megatron_vcap.config.job import load_job_sections

    flags = {f"judge.{key}": getattr(args, flag, None) for flag, key in _JUDGE_FLAGS.items()}
    flags["reward.think_backend"] = getattr(args, "backend", None)
    sub = getattr(args, "reward_command", None) or getattr(args, "data_command", None)
    command = " ".join(x for x in ("vcap", getattr(args, "command", None), sub) if x)
    cfg = load_job_sections(
        args.config, args.overrides, sections=("reward", "judge"), command=command, flags=flags
    )
    return cfg.reward, cfg.judge


def load_responses(path: str | os.PathLike, known_ids: set[str]) -> list[tuple[int, str, str]]:
    """(line, sample id, response) per line of a responses JSONL; errors name ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: responses file not found")
    out, problems = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{line_no}: invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{line_no}: expected a JSON object")
                continue
            sid = obj.get("id", obj.get("sample_id"))
            response = obj.get("response")
            if not isinstance(sid, str) or not sid:
                problems.append(f"{path}:{line_no}: field 'id': expected a sample id string")
            elif sid not in known_ids:
                problems.append(f"{path}:{line_no}: field 'id': '{sid}' is not in the manifest")
            elif not isinstance(response, str):
                problems.append(f"{path}:{line_no}: field 'response': expected a string")
            else:
                out.append((line_no, sid, response))
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(f"{len(problems)} bad line(s):\n" + "\n".join(problems[:20]) + more)
    if not out:
        raise ConfigError(f"{path}: no responses")
    return out


def _load_samples(manifest: str) -> dict[str, Any]:
    from megatron_vcap.data.manifest import ManifestError, load_manifest

    try:
        return {s.id: s for s in load_manifest(manifest)}
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None


def score_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from megatron_vcap.rewards.service import RewardRequest, RewardService, summarize_results

    reward_cfg, judge_cfg = build_configs(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    samples = _load_samples(args.manifest)
    rows = load_responses(args.responses, set(samples))
    requests = [
        RewardRequest(sid, text, samples[sid].caption, samples[sid].subjects, samples[sid].events)
        for _, sid, text in rows
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    results = []
    with RewardService(reward_cfg, judge_cfg) as service:
        # Submit everything first: judge calls of later batches overlap earlier ones.
        handles = [
            service.submit(requests[i : i + args.batch_size])
            for i in range(0, len(requests), args.batch_size)
        ]
        with (
            open(tmp, "w", encoding="utf-8") as f,
            tqdm(
                total=len(requests),
                desc="scoring",
                unit="resp",
                file=sys.stderr,
                disable=args.quiet,
            ) as bar,
        ):
            for handle in handles:
                for result in handle.result():
                    line_no = rows[len(results)][0]
                    record = {"line": line_no, **result.to_dict()}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    results.append(result)
                    bar.update(1)
        metrics = service.metrics()
    os.replace(tmp, out)
    summary = {
        "responses": len(results),
        "judge": service.judge.name,
        "think_backend": reward_cfg.think_backend,
        "caption_score": reward_cfg.caption_score,
        **summarize_results(results),
        **metrics,
    }
    summary_path = out.with_name(out.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {len(results)} scored responses to {out}")
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) and not value.is_integer() else value
        print(f"  {key:34s} {shown}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("reward", help="offline reward scoring")
    sub = p.add_subparsers(dest="reward_command", metavar="SUBCOMMAND")
    sub.required = True
    s = sub.add_parser("score", help="score a JSONL of model responses against a manifest")
    s.add_argument("--manifest", required=True, help="manifest JSONL with the ground truth")
    s.add_argument("--responses", required=True, help='JSONL lines {"id": ..., "response": ...}')
    s.add_argument("--out", required=True, help="scores JSONL, one line per response")
    s.add_argument("--backend", choices=["lexical", "embedding"], help="think-score similarity")
    s.add_argument("--batch-size", type=int, default=256, help="responses per service batch")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_judge_arguments(s)
    s.set_defaults(func=score_main)
