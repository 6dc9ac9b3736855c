"""Kit section ``decode``: KV-cached decode step time against the HBM bound, batch 8 / 32 / 64.

Model: our ``QwenVLModel`` with Qwen2.5-VL-7B's language model (all 28 layers, bf16, random
weights; a one-block vision tower, never run). Rows: P prompts of 1024 tokens x G = 8 samples
(the GRPO shape; prefix shared), temperature 1, no EOS, so every row decodes every step. Step
time = (time of ``generate`` with N new tokens - time with 1) / (N - 1): prefill and the first
sample cancel. HBM bound = (LM weights + the K/V of every row's context) / bandwidth
(:func:`tools.gpu.flops.decode_bytes_per_step`; context averaged over the steps), with the
datasheet bandwidth (H200 4.8 TB/s, H100 3.35 TB/s) and with a device copy measured here.
Target (issue 13): step <= 2 x the datasheet bound at batch 64.
"""

from __future__ import annotations

import torch

from tools.gpu import flops, shapes
from tools.gpu.common import (
    SectionContext,
    SectionResult,
    best_time,
    device,
    init_single_rank,
    measure_copy_bandwidth,
    peak_memory_gib,
)

GPU = dict(layers=28, prompt=1024, new=33, batches=(8, 32, 64), repeats=2, copy_bytes=4 * 2**30)
DRY = dict(layers=2, prompt=48, new=9, batches=(1, 2, 4), repeats=1, copy_bytes=64 * 2**20)
TARGET_RATIO = 2.0


def make_prompts(count: int, length: int, vocab: int, seed: int):
    from megatron_vcap.rollout.types import PromptSpec

    gen = torch.Generator().manual_seed(seed)
    return [PromptSpec.from_text_ids(torch.randint(0, vocab - 16, (length,), generator=gen))
            for _ in range(count)]  # fmt: skip


def time_batch(model, spec, batch: int, shape: dict, deadline: float) -> dict:
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams

    group = min(8, batch)
    prompts = make_prompts(batch // group, shape["prompt"], spec.vocab_size, seed=batch)

    def run(new: int):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new)
        return generate(model, prompts, sampling=params, group_size=group, seed=0)

    t1, _ = best_time(lambda: run(1), shape["repeats"], deadline=deadline)
    tn, outs = best_time(lambda: run(shape["new"]), shape["repeats"], deadline=deadline)
    steps = shape["new"] - 1
    return {
        "rows": batch,
        "group_size": group,
        "step_ms": 1e3 * (tn - t1) / steps,
        "prefill_and_first_token_s": t1,
        "all_rows_full_length": all(o.response_ids_R.numel() == shape["new"] for o in outs),
        "context_mean": shape["prompt"] + shape["new"] / 2,
    }


def run(ctx: SectionContext) -> SectionResult:
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.hf_config import describe_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    res = SectionResult()
    init_single_rank()
    gpu = device().type == "cuda"
    shape = DRY if ctx.dry_run else GPU
    config = shapes.qwen_vl_config(ctx.dry_run, layers=shape["layers"], vision_depth=1)
    dtype, dtype_bytes = ("bf16", 2) if gpu else ("fp32", 4)
    model = build_qwen_vl_model(config, ModelConfig(params_dtype=dtype, transformer_impl="auto"))
    spec = describe_hf_config(config)
    ceiling = flops.datasheet_ceiling(torch.cuda.get_device_name(0) if gpu else "cpu")
    measured_bw = measure_copy_bandwidth(shape["copy_bytes"])
    res.figures.update(lm_layers=spec.num_layers, dtype=dtype, prompt_tokens=shape["prompt"],
                       new_tokens=shape["new"], measured_copy_tb_s=measured_bw / 1e12,
                       datasheet_hbm_tb_s=(ceiling.hbm_bytes_per_s or 0) / 1e12 or None)  # fmt: skip
    lm = flops.lm_shape(spec)
    for batch in shape["batches"]:
        if ctx.time_left() < 15:
            res.notes.append(f"batch {batch} skipped: the deadline is near")
            continue
        row = time_batch(model, spec, batch, shape, ctx.deadline - 10)
        step_bytes = flops.decode_bytes_per_step([row["context_mean"]] * batch, **lm,
                                                 dtype_bytes=dtype_bytes)  # fmt: skip
        row["bytes_per_step_gb"] = step_bytes / 1e9
        row["bound_ms_measured_bw"] = 1e3 * step_bytes / measured_bw
        row["ratio_vs_measured_bw"] = row["step_ms"] / row["bound_ms_measured_bw"]
        if ceiling.hbm_bytes_per_s:
            row["bound_ms"] = 1e3 * step_bytes / ceiling.hbm_bytes_per_s
            row["ratio"] = row["step_ms"] / row["bound_ms"]
        row["tokens_per_s"] = batch / (row["step_ms"] / 1e3)
        res.figures[f"batch_{batch}"] = row
        res.check(f"batch {batch}: every row decoded every step", row["all_rows_full_length"])
        if not ctx.dry_run:  # CPU timings on a shared machine are noise; never fail on them
            res.check(f"batch {batch}: step time > 0", row["step_ms"] > 0, value=row["step_ms"])
        ctx.save_partial(res)
    res.figures["peak_memory_gib"] = peak_memory_gib()
    largest = res.figures.get(f"batch_{shape['batches'][-1]}")
    if largest is not None:
        ratio = largest.get("ratio", largest["ratio_vs_measured_bw"])
        res.target(f"decode step / HBM bound at batch {largest['rows']}", ratio,
                   f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO)  # fmt: skip
    res.check("largest batch measured", largest is not None)
    return res
