"""Benchmark evaluation generation (``vcap eval ... --ckpt``) on the CPU demo's model.

Captions the same synthetic videos twice in this one process through the eval path
(``megatron_vcap.eval.predict.caption_batches``: video decode + preprocessing, the benchmark
prompt, greedy batched KV-cached generation): once one video at a time (the baseline) and once
``--batch-size`` videos per batch. Prints captions/s and generated tokens/s of each, the ratio
batched / one-at-a-time, and whether both gave the same captions.

The model is the demo's architecture (``DemoSettings``: a tiny Qwen2.5-VL) with random weights,
or the weights of ``--ckpt`` (e.g. a ``vcap demo`` checkpoint); video and generation settings are
the demo recipe's (``megatron_vcap/recipes/demo_cpu.yaml``) unless overridden.
Usage: ``python tools/bench_eval.py [--videos 16] [--batch-size 8] [--max-new-tokens 64]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ckpt", default=None, help="a megatron_vcap checkpoint of the demo model")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    return p.parse_args(argv)


def _setup(args, root: Path):
    from megatron_vcap.config.job import load_job_sections
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir, recipe_path
    from megatron_vcap.eval.readers import EvalSample
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.parallel.runtime import init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    ctx = init_distributed(ParallelConfig(), seed=0)
    data = make_synthetic_dataset(root / "data", args.videos, seed=5)  # the demo's video size
    cfg = load_job_sections(
        recipe_path(),
        sections=("model", "parallel", "data", "rollout"),
        command="bench_eval",
        flags={"rollout.max_new_tokens": args.max_new_tokens},
    )
    samples = [
        EvalSample(str(i), p.name, "Describe the video in detail.", video_path=str(p))
        for i, p in enumerate(sorted(Path(data.videos_dir).glob("*.mp4")))
    ]
    if args.ckpt:
        model_dir = Path(args.ckpt) / "hf"
    else:
        model_dir = build_model_dir(root, data.tokenizer_dir, DemoSettings())
    return ctx, cfg, samples, model_dir


def _build(cfg, model_dir: Path, ckpt: str | None):
    import torch
    from transformers import AutoTokenizer

    from megatron_vcap.convert.checkpoint import load_model_checkpoint
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.rl.policy import PromptBuilder

    torch.manual_seed(0)
    hf_config = load_hf_config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = build_qwen_vl_model(hf_config, cfg.model, init_weights=ckpt is None)
    if ckpt:
        load_model_checkpoint(ckpt, model)
    model.eval()
    return model, tokenizer, PromptBuilder(tokenizer, hf_config)


def _time(model, builder, tokenizer, samples, cfg, batch: int, tp_group):
    from megatron_vcap.eval.predict import caption_batches

    cfg.rollout.prompts_per_batch = batch
    start = time.perf_counter()
    records = []
    for recs in caption_batches(model, builder, tokenizer, samples, cfg, structured=False,
                                on_error="stop", tp_group=tp_group):  # fmt: skip
        records += recs
    return time.perf_counter() - start, records


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ctx, cfg, samples, model_dir = _setup(args, Path(tmp))
        model, tokenizer, builder = _build(cfg, model_dir, args.ckpt)
        _time(model, builder, tokenizer, samples[:1], cfg, 1, ctx.tp_group)  # warm-up
        one_s, one = _time(model, builder, tokenizer, samples, cfg, 1, ctx.tp_group)
        many_s, many = _time(model, builder, tokenizer, samples, cfg, args.batch_size, ctx.tp_group)
    n = len(samples)
    tok_one = sum(r["num_tokens"] for r in one)
    tok_many = sum(r["num_tokens"] for r in many)
    same = [r["caption"] for r in one] == [r["caption"] for r in many]
    figures = {
        "videos": n,
        "max_new_tokens": args.max_new_tokens,
        "one_at_a_time_captions_per_s": n / one_s,
        "batched_captions_per_s": n / many_s,
        "speedup": one_s / many_s,
        "one_at_a_time_tokens_per_s": tok_one / one_s,
        "batched_tokens_per_s": tok_many / many_s,
        "same_captions": same,
    }
    print(f"eval generation, demo model ({'checkpoint' if args.ckpt else 'random weights'}), "
          f"CPU, {args.threads} thread(s), {n} videos, <= {args.max_new_tokens} new tokens")  # fmt: skip
    print(f"  one video at a time : {figures['one_at_a_time_captions_per_s']:.2f} captions/s "
          f"({figures['one_at_a_time_tokens_per_s']:.0f} tokens/s)")  # fmt: skip
    print(f"  batch of {args.batch_size:<11}: {figures['batched_captions_per_s']:.2f} captions/s "
          f"({figures['batched_tokens_per_s']:.0f} tokens/s)")  # fmt: skip
    print(f"  batched / one at a time: {figures['speedup']:.2f}x; same captions: {same}")
    return figures


if __name__ == "__main__":
    main()
