"""One benchmark run: read the data, get captions (generated here or ``--predictions``), judge,
aggregate, write the outputs.

Resumable end to end: generated captions are appended to ``<out>/generation/`` as they finish and
reused by a rerun; every judge answer is cached (``<out>/judge_cache`` unless ``--judge-cache``),
so rerunning the same command after a kill asks the judge only what it never answered.
Under torchrun / srun, generation is sharded over the data-parallel ranks and judging runs on
rank 0 only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from megatron_vcap.eval import aggregate, judging
from megatron_vcap.eval.readers import (
    DREAM_SUBSETS,
    VDC_TYPES,
    EvalDataError,
    EvalSample,
    Prediction,
    load_vdc_pools,
    read_carebench,
    read_dream1k,
    read_predictions,
    read_vdc,
)
from megatron_vcap.eval.report import write_outputs
from megatron_vcap.eval.templates import load_templates

log = logging.getLogger(__name__)


def parse_types(text: str | None) -> list[str]:
    if not text:
        return list(VDC_TYPES)
    types = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in VDC_TYPES]
    if bad or not types:
        raise EvalDataError(
            f"--types: unknown type(s) {bad}; expected some of {','.join(VDC_TYPES)}"
        )
    return list(dict.fromkeys(types))


def load_samples(args, templates) -> list[EvalSample]:
    """The benchmark's samples; ``--limit N`` keeps the first N (VDC: of each type)."""
    if args.benchmark == "dream1k":
        samples = read_dream1k(args.annotations)
    elif args.benchmark == "carebench":
        samples = read_carebench(args.annotations)
        instruction = templates["carebench_instruction"].text()
        for s in samples:
            s.instruction = instruction
    else:
        types = parse_types(args.types)
        samples = read_vdc(args.qa_dir, types, load_vdc_pools(args.prompt_pools, types))
    limit = getattr(args, "limit", None)
    if limit is not None:
        if limit < 1:
            raise EvalDataError(f"--limit: must be >= 1, got {limit}")
        taken: dict[str, int] = {}
        kept = []
        for s in samples:
            taken[s.vtype] = taken.get(s.vtype, 0) + 1
            if taken[s.vtype] <= limit:
                kept.append(s)
        log.warning("--limit %d: %d of %d samples (not a full benchmark run)", limit, len(kept),
                    len(samples))  # fmt: skip
        samples = kept
    return samples


def build_judge_config(args):
    from megatron_vcap.rewards.config import JudgeConfig

    cache = args.judge_cache or str(Path(args.out) / "judge_cache")
    cfg = JudgeConfig(
        kind="openai",
        base_url=args.judge_url,
        model=args.judge_model,
        api_key_env=args.judge_key_env,
        concurrency=args.judge_concurrency,
        timeout_s=args.judge_timeout,
        max_retries=args.judge_retries,
        backoff_s=args.judge_backoff,
        max_backoff_s=max(args.judge_backoff, 30.0),
        cache_dir=cache,
        temperature=args.judge_temperature,
        max_tokens=args.judge_max_tokens,
    )
    cfg.validate()
    return cfg


def match_predictions(
    samples: list[EvalSample], preds: dict[str, Prediction], on_missing: str, source: str
) -> tuple[list[EvalSample], list[str]]:
    """Samples that have a caption; the keys of those without one (or a stop, by flag)."""
    missing = [s.key for s in samples if s.key not in preds]
    extra = len(set(preds) - {s.key for s in samples})
    if extra:
        log.warning("%s: %d caption(s) match no benchmark sample (ignored)", source, extra)
    if missing:
        listed = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        if on_missing == "stop":
            raise EvalDataError(
                f"{source}: no caption for {len(missing)} sample(s): {listed} "
                "(--on-missing skip drops and counts them)"
            )
        log.warning("%s: no caption for %d sample(s), skipped: %s", source, len(missing), listed)
    return [s for s in samples if s.key in preds], missing


async def _judge_samples(judge_cfg, templates, bench, samples, preds, max_items):
    from megatron_vcap.rewards.judges.openai_judge import OpenAIJudge

    judge = OpenAIJudge(judge_cfg)
    try:
        if bench == "vdc":
            jobs = [judging.judge_vdc_sample(judge, templates, s, preds[s.key]) for s in samples]
            return await judging.judge_all(judge, jobs, "judging vdc"), judge.stats()
        kinds = ("events",) if bench == "dream1k" else ("events", "objects")
        jobs = [
            judging.judge_autodq(judge, templates, s, preds[s.key], kind, max_items)
            for s in samples
            for kind in kinds
        ]
        results = await judging.judge_all(judge, jobs, f"judging {bench}")
        return [
            results[i : i + len(kinds)] for i in range(0, len(results), len(kinds))
        ], judge.stats()
    finally:
        await judge.aclose()


def _record(sample: EvalSample, pred: Prediction) -> dict:
    rec = {"id": sample.id, "video": sample.video, "caption": pred.caption, "think": pred.think}
    if sample.vtype:
        rec["type"] = sample.vtype
    if sample.group:
        rec["group"] = sample.group
    if sample.meta:
        rec["meta"] = sample.meta
    return rec


def score(args, samples, preds, templates, settings: dict) -> dict:
    """Judge and aggregate; writes the outputs and returns results.json's content."""
    bench, out = args.benchmark, Path(args.out)
    source = args.predictions or "generated captions"
    samples, missing = match_predictions(samples, preds, args.on_missing, source)
    judge_cfg = build_judge_config(args)
    judged, stats = asyncio.run(
        _judge_samples(judge_cfg, templates, bench, samples, preds, args.max_items)
    )
    records = []
    for s, res in zip(samples, judged):
        rec = _record(s, preds[s.key])
        if bench == "dream1k":
            rec.update(res[0])
        elif bench == "carebench":
            rec.update(action=res[0], object=res[1])
            rec.setdefault("group", "")
        else:
            rec.update(res)
            if "error" not in res and "accuracy" not in res:
                rec["error"] = "no usable judge answer for any question"
        records.append(rec)

    if bench == "dream1k":
        results = aggregate.aggregate_dream(records, DREAM_SUBSETS)
    elif bench == "carebench":
        results = aggregate.aggregate_carebench(records)
    else:
        results = _aggregate_vdc(records, parse_types(args.types), args.vdc_aggregation)
    results = {"benchmark": bench, **results}
    results["missing"] = len(missing)
    results["settings"] = {
        **settings,
        "judge_model": judge_cfg.model,
        "judge_endpoint": judge_cfg.base_url,
        "judge_temperature": judge_cfg.temperature,
        "judge_max_retries": judge_cfg.max_retries,
        "templates": args.templates or "default",
        "limit": getattr(args, "limit", None),
    }
    results["judge_stats"] = stats
    write_outputs(out, bench, results, records)
    return results


def _aggregate_vdc(records: list[dict], types: list[str], first: str) -> dict:
    videos: dict[str, list[dict]] = {t: [] for t in types}
    for rec in records:
        if "error" not in rec:
            videos[rec["type"]].append({"accuracy": rec["accuracy"], "score": rec["score"]})
    modes = [first] + [m for m in ("official", "unbiased") if m != first]
    by_mode = {m: aggregate.aggregate_vdc(videos, m) for m in modes}
    return {
        "aggregation": first,
        **by_mode[first],
        "aggregations": modes,
        "by_aggregation": by_mode,
        "failed": sum(1 for r in records if "error" in r),
        "failed_qa": sum(len(r.get("failed_qa", [])) for r in records),
        "num_samples": len(records),
    }


def load_generation_settings(predictions: str) -> dict:
    """Generation settings recorded by ``vcap eval predict`` next to its predictions file."""
    settings = {"model": f"predictions:{predictions}", "frames": None, "fps": None,
                "max_pixels": None, "max_new_tokens": None}  # fmt: skip
    meta = Path(predictions).with_name("generation.json")
    if meta.is_file():
        try:
            settings.update(json.loads(meta.read_text()))
        except ValueError:
            log.warning("%s: unreadable; generation settings not recorded", meta)
    else:
        log.warning("%s: no generation.json next to it; frames / fps not recorded", predictions)
    settings["predictions"] = str(predictions)
    return settings


def run_benchmark(args) -> int:
    templates = load_templates(args.templates)
    samples = load_samples(args, templates)
    vdc = args.benchmark == "vdc"
    if args.predictions:
        from megatron_vcap.parallel.launch_env import read_launch_env

        if read_launch_env().rank != 0:  # launched on several ranks: scoring is rank 0's job
            return 0
        preds = read_predictions(args.predictions, vdc=vdc)
        settings = load_generation_settings(args.predictions)
    else:
        from megatron_vcap.eval.predict import generate_predictions

        generated = generate_predictions(args, samples)
        if generated is None:  # a rank other than 0: its share of the captions is written
            return 0
        preds, settings = generated
    results = score(args, samples, preds, templates, settings)
    print(summary_line(results))
    print(f"results: {Path(args.out) / 'results.json'}; report: {Path(args.out) / 'report.md'}")
    return 0


def summary_line(results: dict) -> str:
    bench = results["benchmark"]
    if bench == "dream1k":
        o = results["overall"]
        head = f"F1 {100 * o['f1']:.1f}  P {100 * o['precision']:.1f}  R {100 * o['recall']:.1f}"
    elif bench == "carebench":
        a, o = results["action"]["overall"], results["object"]["overall"]
        head = f"action F1 {100 * a['f1']:.1f}  object F1 {100 * o['f1']:.1f}"
    else:
        avg = results["average"]
        head = f"accuracy {100 * avg['accuracy']:.1f}  score {avg['score']:.2f} ({results['aggregation']})"
    return (
        f"{bench}: {head}  samples {results['num_samples']}  failed {results['failed']}  "
        f"missing {results['missing']}"
    )
