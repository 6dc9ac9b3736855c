"""Held-out reward evaluation: greedy captions for a manifest, scored by the training rewards.

``vcap eval reward --config F --ckpt DIR --manifest M --out results.json`` loads a checkpoint
(a training or converted one), decodes each held-out video greedily, scores the responses with
the configured rewards (format, Tscore, caption score) and writes per-sample results plus means.
Samples are split over data-parallel ranks; rank 0 gathers and writes. The benchmark protocols
(DREAM-1K, VDC, CAREBENCH) are separate evaluators in this package's ``eval/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vcap.progress import progress

log = logging.getLogger(__name__)


def _prepare(samples, data_cfg, tokenizer):
    """Decode + preprocess each sample into a loader-like item (sample, video, prompt)."""
    from types import SimpleNamespace

    from megatron_vcap.data.prompts import build_prompt
    from megatron_vcap.data.vision import process_sample_video

    items = []
    for sample in samples:
        video = process_sample_video(sample, data_cfg)
        items.append(
            SimpleNamespace(sample=sample, video=video, prompt=build_prompt(tokenizer, video))
        )
    return items


def evaluate_items(
    model,
    items,
    prompt_builder,
    tokenizer,
    reward_service,
    *,
    rollout_cfg,
    batch_size: int,
    tp_group=None,
    show_progress: bool = False,
    pp_group=None,
) -> list[dict]:
    """Greedy responses for ``items`` and their reward components, one dict per item
    (``show_progress``: a bar over the batches on a terminal's stderr). ``reward_service=None``
    (the non-leading ranks of a model-parallel group) generates only and returns no records."""
    from megatron_vcap.rl.policy import decode_responses
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams

    sampling = SamplingParams.from_config(
        rollout_cfg, prompt_builder.eos_token_ids, temperature=0.0
    )
    model.eval()
    records = []
    starts = range(0, len(items), batch_size)
    for start in progress(starts, desc="eval batches", unit="batch", enabled=show_progress):
        chunk = items[start : start + batch_size]
        specs = [prompt_builder.prompt_spec(item) for item in chunk]
        with torch.no_grad():
            outputs = generate(
                model,
                specs,
                sampling=sampling,
                group_size=1,
                decode_fn=prompt_builder.decode,
                tp_group=tp_group,
                pp_group=pp_group,
            )
        if reward_service is None:  # another rank of this model replica scores the batch
            continue
        texts = decode_responses(tokenizer, outputs)
        requests = prompt_builder.reward_requests(chunk, outputs, texts)
        results = reward_service.submit(requests).result()
        for out, text, res in zip(outputs, texts, results):
            records.append(
                {
                    "id": chunk[out.prompt_index].sample.id,
                    "response": text,
                    "format": res.format,
                    "think": res.think,
                    "caption": res.caption,
                    "total": res.total,
                    "failed": res.failed,
                    "parse_failure": res.parse_failure,
                }
            )
    model.train()
    return records


def summarize(records: list[dict]) -> dict[str, float]:
    keys = ("format", "think", "caption", "total")
    n = max(len(records), 1)
    summary = {k: sum(r[k] for r in records) / n for k in keys}
    summary["num_samples"] = len(records)
    summary["judge_failures"] = sum(1 for r in records if r["failed"])
    return summary


def evaluate_main(cfg, ckpt_dir: str, manifest: str, out_path: str, batch_size: int = 8) -> dict:
    """Entry of ``vcap eval reward`` (under torchrun/srun, or single process)."""
    from transformers import AutoTokenizer

    from megatron_vcap.convert.checkpoint import load_model_checkpoint
    from megatron_vcap.data.manifest import load_manifest
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.parallel.runtime import destroy_distributed, init_distributed
    from megatron_vcap.rewards.service import RewardService
    from megatron_vcap.rl.policy import PromptBuilder

    owns_process_group = not torch.distributed.is_initialized()
    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    hf_dir = Path(ckpt_dir) / "hf"
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{ckpt_dir}: no hf/config.json (not a megatron_vcap checkpoint)")
    hf_config = load_hf_config(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = build_qwen_vl_model(hf_config, cfg.model, init_weights=False)
    load_model_checkpoint(ckpt_dir, model)
    samples = load_manifest(manifest)
    mine = samples[ctx.dp_rank :: ctx.dp_size]
    # One judge per model replica: the other TP / PP ranks generate with it but do not score.
    leader = ctx.tp_rank == 0 and ctx.pp_rank == 0
    service = RewardService(cfg.reward, cfg.judge) if leader else None
    builder = PromptBuilder(tokenizer, hf_config)
    records = []
    try:
        starts = range(0, len(mine), batch_size)
        for start in progress(starts, desc="eval", unit="batch", enabled=ctx.rank == 0):
            # Decoded one batch at a time: memory holds one batch of clips, not the manifest.
            items = _prepare(mine[start : start + batch_size], cfg.data, tokenizer)
            records += evaluate_items(
                model,
                items,
                builder,
                tokenizer,
                service,
                rollout_cfg=cfg.rollout,
                batch_size=batch_size,
                tp_group=ctx.tp_group,
            )
    finally:
        if service is not None:
            service.close()
    gathered = [None] * ctx.dp_size
    if ctx.dp_size > 1:
        dist.all_gather_object(gathered, records, group=ctx.dp_group_gloo)
    else:
        gathered = [records]
    all_records = [r for part in gathered for r in part]
    summary = summarize(all_records)
    if ctx.world_size > 1:  # the leaders' DP group holds every record; rank 0 is one of them
        shared = [summary]
        dist.broadcast_object_list(shared, src=0)
        summary = shared[0]
    if ctx.rank == 0:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(
            json.dumps({"summary": summary, "samples": all_records}, indent=1)
        )
        log.info("eval %s: %s", ckpt_dir, summary)
    destroy_distributed(process_group=owns_process_group)
    return summary
