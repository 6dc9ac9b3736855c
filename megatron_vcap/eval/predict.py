"""Benchmark captions from a Megatron checkpoint: greedy, batched, KV-cached, sharded over ranks.

The checkpoint (a training one or one made by ``vcap convert``) is loaded at any TP and PP
(generation runs through the pipeline stages, ``rollout/pipeline.py``); the samples still to
caption are split over the data-parallel ranks, and
each rank generates its share in batches through the rollout engine (``rollout.generate``: the
prompt prefilled once into the KV cache, then batched decoding). Every batch's captions are
appended to ``<out>/generation/part-dp<r>.jsonl`` (flushed and fsynced) by the rank's first TP
rank, so a killed run loses at most the batches in flight; a rerun reads every part file first
and captions only what is missing, whatever its rank count. Rank 0 then writes
``<out>/predictions.jsonl`` (the ``--predictions`` format, plus the think block and the raw
response) and ``<out>/generation.json`` (the settings).

For a structured-output model the ``<answer>`` block is the caption and the ``<think>`` block
is kept in the records.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.eval.readers import EvalSample, Prediction, check_videos

log = logging.getLogger(__name__)

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def split_response(text: str) -> tuple[str, str | None]:
    """(caption, think block): the answer block when there is one, else the text without its
    think block."""
    think = _THINK.search(text)
    answer = _ANSWER.search(text)
    caption = answer.group(1) if answer else _THINK.sub("", text)
    return caption.strip(), think.group(1).strip() if think else None


# ------------------------------------------------------------------------------ config
def load_eval_config(args):
    """Model / parallel / data / rollout sections: ``--config``, else the training run's own
    ``config.yaml`` (``<run>/checkpoints/<step>``), else the defaults; then the flags and
    ``section.key=value`` overrides."""
    from megatron_vcap.config.job import load_job_sections

    path = args.config
    if path is None:
        run_cfg = Path(args.ckpt).resolve().parent.parent / "config.yaml"
        if run_cfg.is_file():
            path = str(run_cfg)
            log.info("eval: model / parallel / data settings from the training run's %s", run_cfg)
    frames = args.frames
    flags = {
        "data.fps": args.fps,
        "data.min_frames": frames,
        "data.max_frames": frames if frames is not None else args.max_frames,
        "data.max_pixels": args.max_pixels,
        "rollout.max_new_tokens": args.max_new_tokens,
        "rollout.prompts_per_batch": args.batch_size,
    }
    sections = ("model", "parallel", "data", "rollout")
    # A training run's config.yaml also holds train / grpo / reward sections; they are ignored.
    cfg = load_job_sections(
        path, args.overrides, sections=sections, command="vcap eval", flags=flags
    )
    if args.max_pixels is not None and cfg.data.min_pixels > cfg.data.max_pixels:
        cfg.data.min_pixels = cfg.data.max_pixels
    if frames is not None and frames < 2:
        raise ConfigError(f"--frames: need at least 2 (one temporal patch), got {frames}")
    for section in sections:
        getattr(cfg, section).validate()
    return cfg


# ------------------------------------------------------------------------------ resumable parts
def load_generated(gen_dir: Path) -> dict[str, dict]:
    """Every finished caption in the part files (a torn last line of a killed run is ignored)."""
    done: dict[str, dict] = {}
    for part in sorted(gen_dir.glob("part-*.jsonl")):
        for n, line in enumerate(part.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: unreadable line (a killed run's last write?) ignored", part, n)
    return done


class PartWriter:
    """Append-only JSONL, fsynced per batch; starts on a fresh line after a torn write."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held across batches
        if torn:
            self._f.write("\n")

    def write(self, records: list[dict]) -> None:
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------ generation
def _video_inputs(sample: EvalSample, data_cfg):
    from megatron_vcap.data.vision import process_video

    return process_video(
        sample.video_path,
        fps=data_cfg.fps,
        min_frames=data_cfg.min_frames,
        max_frames=data_cfg.max_frames,
        min_pixels=data_cfg.min_pixels,
        max_pixels=data_cfg.max_pixels,
        total_pixels=data_cfg.total_pixels,
        backend=data_cfg.video_backend,
        num_threads=data_cfg.decode_threads,
    )


def caption_batches(model, builder, tokenizer, samples, cfg, *, structured, on_error, tp_group,
                    pp_group=None):  # fmt: skip
    """Yield the records of each batch of ``samples`` (greedy captions, or a decode error)."""
    from types import SimpleNamespace

    import torch

    from megatron_vcap.data.prompts import STRUCTURED_THINKING_INSTRUCTION, build_prompt
    from megatron_vcap.data.video_io import VideoDataError
    from megatron_vcap.rl.policy import decode_responses
    from megatron_vcap.rollout.generate import generate

    sampling = builder.sampling_params(cfg.rollout, temperature=0.0)
    batch = cfg.rollout.prompts_per_batch
    last: tuple[str, object] | None = None  # VDC captions one video five times: decode it once
    for start in range(0, len(samples), batch):
        chunk, items, records = samples[start : start + batch], [], []
        for s in chunk:
            try:
                if last is not None and last[0] == s.video_path:
                    video = last[1]
                else:
                    video = _video_inputs(s, cfg.data)
                    last = (s.video_path, video)
            except VideoDataError as exc:
                if on_error == "stop":
                    raise ConfigError(
                        f"{s.video_path}: {exc} (--on-missing skip counts it)"
                    ) from None
                log.warning("skipping %s: %s", s.video_path, exc)
                records.append({"key": s.key, "id": s.id, "type": s.vtype, "error": str(exc)})
                continue
            instruction = STRUCTURED_THINKING_INSTRUCTION if structured else s.instruction
            prompt = build_prompt(tokenizer, video, instruction=instruction)
            items.append(SimpleNamespace(sample=s, video=video, prompt=prompt, text=instruction))
        if items:
            specs = [builder.prompt_spec(it) for it in items]
            with torch.no_grad():
                outputs = generate(
                    model, specs, sampling=sampling, group_size=1, decode_fn=builder.decode,
                    kv_layout=cfg.rollout.kv_layout, tp_group=tp_group, pp_group=pp_group,
                )  # fmt: skip
            texts = decode_responses(tokenizer, outputs)
            for out, text in zip(outputs, texts):
                item = items[out.prompt_index]
                caption, think = split_response(text)
                records.append(
                    {
                        "key": item.sample.key,
                        "id": item.sample.id,
                        "type": item.sample.vtype,
                        "caption": caption,
                        "think": think,
                        "response": text,
                        "instruction": item.text,
                        "finish_reason": out.finish_reason,
                        "num_tokens": int(out.response_ids_R.numel()),
                        "num_frames": item.video.num_frames,
                        "sampled_fps": round(item.video.sampled_fps, 4),
                        "resized_hw": list(item.video.resized_hw),
                    }
                )
        yield records


def _build_model(cfg, ckpt: str):
    from transformers import AutoTokenizer

    from megatron_vcap.convert.checkpoint import load_model_checkpoint
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.rl.policy import PromptBuilder

    hf_dir = Path(ckpt) / "hf"
    hf_config = load_hf_config(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = build_qwen_vl_model(hf_config, cfg.model, init_weights=False)
    load_model_checkpoint(ckpt, model)
    model.eval()
    return model, tokenizer, PromptBuilder(tokenizer, hf_config)


def _check_before_launch(cfg, args, world_size: int) -> None:
    """What can fail before a process group exists: the checkpoint folder, the launch's world
    size against the layout, the model's split over TP x PP."""
    from megatron_vcap.models.hf_config import (
        check_parallel_layout,
        describe_hf_config,
        load_hf_config,
    )

    hf_dir = Path(args.ckpt) / "hf"
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"--ckpt {args.ckpt}: no hf/config.json (not a megatron_vcap checkpoint)")
    cfg.parallel.validate_world_size(world_size)
    p = cfg.parallel
    spec = describe_hf_config(load_hf_config(hf_dir))
    check_parallel_layout(spec, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)


def generate_predictions(args, samples: list[EvalSample]):
    """Captions for ``samples`` (collective). Rank 0 returns ({key: Prediction}, settings);
    the other ranks return None once their share is written."""
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_vcap.parallel.launch_env import read_launch_env
    from megatron_vcap.parallel.runtime import destroy_distributed, init_distributed

    cfg = load_eval_config(args)
    env = read_launch_env()
    _check_before_launch(cfg, args, env.world_size)
    kept, missing = check_videos(samples, args.videos, args.on_missing)
    out = Path(args.out)
    gen_dir = out / "generation"
    owns_group = not dist.is_initialized()
    ctx = init_distributed(cfg.parallel, seed=0)
    try:
        done = load_generated(gen_dir)  # every rank reads before any rank appends
        dist.barrier()
        # By video (stable), so that a video's captions of several VDC types sit together.
        todo = sorted((s for s in kept if s.key not in done), key=lambda s: s.video_path)
        mine = todo[ctx.dp_rank :: ctx.dp_size]
        model, tokenizer, builder = _build_model(cfg, args.ckpt)
        writer = (
            PartWriter(gen_dir / f"part-dp{ctx.dp_rank:03d}.jsonl")
            if ctx.tp_rank == 0 and ctx.pp_rank == 0  # every stage holds the same captions
            else None
        )
        bar = tqdm(total=len(mine), desc=f"captions (rank {ctx.rank})", unit="video",
                   file=sys.stderr, disable=ctx.rank != 0, mininterval=1.0)  # fmt: skip
        for records in caption_batches(
            model, builder, tokenizer, mine, cfg, structured=args.structured,
            on_error=args.on_missing, tp_group=ctx.tp_group, pp_group=ctx.pp_group,
        ):  # fmt: skip
            if writer is not None:
                writer.write(records)
            bar.update(len(records))
        bar.close()
        if writer is not None:
            writer.close()
        dist.barrier()
        if ctx.rank != 0:
            return None
        settings = generation_settings(
            args, cfg, ctx, reused=len(kept) - len(todo), missing=missing
        )
    finally:
        destroy_distributed(process_group=owns_group)
    return collect_predictions(out, kept, settings)


def generation_settings(args, cfg, ctx, *, reused: int, missing: list[str]) -> dict:
    return {
        "model": str(Path(args.ckpt).resolve()),
        "frames": args.frames,
        "fps": cfg.data.fps,
        "min_frames": cfg.data.min_frames,
        "max_frames": cfg.data.max_frames,
        "max_pixels": cfg.data.max_pixels,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "decoding": "greedy",
        "instruction": "structured-thinking" if args.structured else "benchmark",
        "prompts_per_batch": cfg.rollout.prompts_per_batch,
        "tp": cfg.parallel.tensor_model_parallel_size,
        "pp": cfg.parallel.pipeline_model_parallel_size,
        "dp": ctx.dp_size,
        "captions_reused": reused,
        "missing_videos": len(missing),
    }


def collect_predictions(out: Path, kept: list[EvalSample], settings: dict):
    """Rank 0: merge the part files into predictions.jsonl (sample order) and generation.json."""
    from megatron_vcap.eval.report import write_atomic

    done = load_generated(out / "generation")
    preds, lines, failed = {}, [], 0
    for s in kept:
        rec = done.get(s.key)
        if rec is None or "error" in rec:
            failed += int(rec is not None)
            continue
        preds[s.key] = Prediction(rec["caption"], rec.get("think"), rec.get("response"))
        row = {"id": s.id, "caption": rec["caption"], "think": rec.get("think"),
               "response": rec.get("response"), "instruction": rec.get("instruction"),
               "num_frames": rec.get("num_frames")}  # fmt: skip
        if s.vtype:
            row["type"] = s.vtype
        lines.append(json.dumps(row, ensure_ascii=False))
    settings["video_decode_failures"] = failed
    write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    write_atomic(out / "generation.json", json.dumps(settings, indent=1))
    return preds, settings


def predict_main(args) -> int:
    """``vcap eval predict BENCH``: only the captions (``<out>/predictions.jsonl``)."""
    from megatron_vcap.eval.run import load_samples
    from megatron_vcap.eval.templates import load_templates

    if not args.videos:
        raise ConfigError(f"vcap eval predict {args.benchmark}: needs --videos DIR")
    samples = load_samples(args, load_templates(args.templates))
    result = generate_predictions(args, samples)
    if result is not None:
        preds, settings = result
        print(
            f"{len(preds)} caption(s) ({settings['captions_reused']} reused) -> "
            f"{Path(args.out) / 'predictions.jsonl'}"
        )
    return 0
