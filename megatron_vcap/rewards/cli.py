"""``vcap reward score``: score a file of model responses offline with the training rewards.

    vcap reward score --manifest M --responses R.jsonl --out S.jsonl \
        [--judge embedded|openai --judge-url URL --judge-model NAME --judge-key-env VAR ...] \
        [--backend lexical|embedding] [--config job.yaml] [reward.KEY=VALUE judge.KEY=VALUE ...]

Each line of R.jsonl is ``{"id": <manifest sample id>, "response": <model output>}`` (several
responses may share a sample id). S.jsonl gets one line per response, in input order, with every
component, the total and any parse / judge failure reason; a summary follows on stdout (and in
``S.summary.json``). Researchers use it to inspect reward behaviour on real outputs.

Nothing is lost and nothing is hidden: results go to ``S.jsonl.partial`` a batch at a time and a
rerun continues from it (``--no-resume`` starts over); the openai judge's answers are cached in
``S.jsonl.judge_cache/`` unless ``--judge-cache`` / ``judge.cache_dir`` names another place or
``--no-judge-cache`` is given; and the exit status is 1 when the judge failed on more than
``--max-failure-fraction`` (default 0.05) of the judged responses, with the failures by reason.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _settings_fingerprint(reward_cfg: RewardConfig, judge_cfg: JudgeConfig) -> dict[str, Any]:
    """What decides the scores (so a resumed run does not mix two settings in one file)."""
    judge = {k: getattr(judge_cfg, k) for k in ("kind", "model", "entail_threshold", "max_events")}
    return {"reward": dataclasses.asdict(reward_cfg), "judge": judge}


def load_partial(path: Path, rows: list[tuple[int, str, str]]) -> list[dict[str, Any]]:
    """Records of an interrupted run's partial output that match the first responses.

    A torn last line (the run was killed mid-write) is dropped; any other mismatch is an error
    naming the line, since resuming would mix outputs.
    """
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, text in enumerate(lines):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                # A torn final write: cut it off, so that appending starts on a fresh line.
                with open(path, "r+", encoding="utf-8") as f:
                    f.truncate(len("".join(lines[:i]).encode("utf-8")))
                break
            raise ConfigError(
                f"{path}:{i + 1}: invalid JSON; delete it or pass --no-resume"
            ) from None
        want = rows[i] if i < len(rows) else None
        if want is None or record.get("line") != want[0] or record.get("sample_id") != want[1]:
            raise ConfigError(
                f"{path}:{i + 1}: does not match the responses file (line {record.get('line')}, "
                f"sample {record.get('sample_id')!r}); delete it or pass --no-resume"
            )
        records.append(record)
    return records


def _result_of(record: dict[str, Any]):
    from megatron_vcap.rewards.service import RewardResult

    names = {f.name for f in dataclasses.fields(RewardResult)}
    return RewardResult(**{k: v for k, v in record.items() if k in names})


def _failure_breakdown(results) -> tuple[int, int, dict[str, int]]:
    """(failed, judged, failures by code) over the samples that went to the judge."""
    from megatron_vcap.rewards.judges.base import failure_code

    judged = [r for r in results if "caption_skipped" not in r.details]
    codes: dict[str, int] = {}
    for r in judged:
        if r.failed:
            code = failure_code(r.failure_reason)
            codes[code] = codes.get(code, 0) + 1
    return sum(codes.values()), len(judged), codes


def score_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from megatron_vcap.rewards.service import RewardRequest, RewardService, summarize_results

    reward_cfg, judge_cfg = build_configs(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if not 0 <= args.max_failure_fraction <= 1:
        raise ConfigError(
            f"--max-failure-fraction: must be in [0, 1], got {args.max_failure_fraction}"
        )
    samples = _load_samples(args.manifest)
    rows = load_responses(args.responses, set(samples))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if judge_cfg.kind == "openai" and not judge_cfg.cache_dir and not args.no_judge_cache:
        # On by default: a killed or repeated run never pays for an answer twice.
        judge_cfg.cache_dir = str(out.with_name(out.name + ".judge_cache"))
    partial = out.with_name(out.name + ".partial")
    settings_path = out.with_name(out.name + ".partial.settings.json")
    settings = _settings_fingerprint(reward_cfg, judge_cfg)
    if args.no_resume:
        partial.unlink(missing_ok=True)
    other_settings = (
        partial.is_file()
        and settings_path.is_file()
        and json.loads(settings_path.read_text()) != json.loads(json.dumps(settings))
    )
    if other_settings:
        raise ConfigError(
            f"{partial}: written with other reward / judge settings; delete it or pass --no-resume"
        )
    done = load_partial(partial, rows)
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")
    if done:
        print(f"resuming: {len(done)} of {len(rows)} responses already in {partial}",
              file=sys.stderr)  # fmt: skip
    results = [_result_of(r) for r in done]
    todo = rows[len(done) :]
    requests = [
        RewardRequest(sid, text, samples[sid].caption, samples[sid].subjects, samples[sid].events)
        for _, sid, text in todo
    ]
    with RewardService(reward_cfg, judge_cfg) as service:
        # Submit everything first: judge calls of later batches overlap earlier ones.
        handles = [
            service.submit(requests[i : i + args.batch_size])
            for i in range(0, len(requests), args.batch_size)
        ]
        bar = tqdm(total=len(rows), initial=len(done), desc="scoring", unit="resp",
                   file=sys.stderr, disable=args.quiet)  # fmt: skip
        with open(partial, "a", encoding="utf-8") as f, bar:
            for handle in handles:
                for result in handle.result():
                    record = {"line": rows[len(results)][0], **result.to_dict()}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    results.append(result)
                    bar.update(1)
                f.flush()  # a batch at a time: a killed run resumes from here
        metrics = service.metrics()
    os.replace(partial, out)
    settings_path.unlink(missing_ok=True)
    failed, judged, codes = _failure_breakdown(results)
    summary = {
        "responses": len(results),
        "resumed": len(done),
        "judge": service.judge.name,
        "judge_cache": judge_cfg.cache_dir or "off",
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
    if judged and failed / judged > args.max_failure_fraction:
        breakdown = ", ".join(
            f"{code}: {n}" for code, n in sorted(codes.items(), key=lambda x: -x[1])
        )
        example = next(r.failure_reason for r in results if r.failed)
        print(
            f"error: the judge failed on {failed} of {judged} judged responses "
            f"({failed / judged:.1%} > --max-failure-fraction {args.max_failure_fraction}): "
            f"{breakdown}\n  first failure: {example}",
            file=sys.stderr,
        )
        return 1
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
    s.add_argument(
        "--max-failure-fraction",
        type=float,
        default=0.05,
        help="exit 1 when more judged responses than this fraction failed (0.05)",
    )
    s.add_argument(
        "--no-resume",
        action="store_true",
        help="start over instead of continuing OUT.partial of an interrupted run",
    )
    s.add_argument(
        "--no-judge-cache",
        action="store_true",
        help="no answer cache (default for the openai judge: OUT.judge_cache/)",
    )
    add_judge_arguments(s)
    s.set_defaults(func=score_main)
