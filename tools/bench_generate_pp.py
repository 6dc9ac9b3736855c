"""Rollout generation tokens/s at PP=2 vs PP=1 on CPU (2 gloo ranks, same weights, same prompts).

PP=1 runs on rank 0 alone (rank 1 waits); PP=2 splits the same model's layers over both ranks
and pipelines ``--microbatches`` row micro-batches through them. Greedy decoding with no stop
token, so every row generates ``--new-tokens`` tokens and both layouts produce the same tokens
(checked). Printed: response tokens/s of each and the ratio; medians of ``--repeats``. Usage:

    python tools/bench_generate_pp.py [--layers 8] [--hidden 256] [--prompts 4] [--group 8]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch


def _prompts(n, length, vocab):
    from megatron_vcap.rollout.types import PromptSpec

    g = torch.Generator().manual_seed(0)
    return [
        PromptSpec.from_text_ids(torch.randint(0, vocab, (length,), generator=g)) for _ in range(n)
    ]


def _init(pp):
    from megatron.core import parallel_state as ps

    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.runtime import init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    return init_distributed(ParallelConfig(pipeline_model_parallel_size=pp), seed=0)


def _time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _run(args):
    import torch.distributed as dist

    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams
    from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

    torch.set_num_threads(1)
    vocab = 1024
    cfg = TinyGPTConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=4 * args.hidden,
        vocab_size=vocab,
        max_sequence_length=args.prompt_len + args.new_tokens + 8,
        mrope_section=[args.hidden // 32, args.hidden // 64, args.hidden // 64],
        core_attention="sdpa",
    )
    prompts = _prompts(args.prompts, args.prompt_len, vocab)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    kw = dict(sampling=sampling, group_size=args.group)

    ctx = _init(1)
    torch.manual_seed(0)
    full = build_tiny_mrope_gpt(cfg)
    weights = {k: v.clone() for k, v in full.state_dict().items() if "extra_state" not in k}
    t1 = tokens1 = None
    if ctx.rank == 0:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out1 = generate(full, prompts, **kw)
            times.append(time.perf_counter() - t0)
        t1 = statistics.median(times)
        tokens1 = [o.response_ids_R.tolist() for o in out1]
    dist.barrier()

    ctx = _init(2)
    model = build_tiny_mrope_gpt(cfg, pipeline_parallel_size=2)
    offset = ctx.pp_rank * (args.layers // 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full_name = re.sub(
                r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.", name
            )
            p.copy_(weights[full_name])
    t2, out2 = _time(
        lambda: generate(
            model, prompts, pp_group=ctx.pp_group, num_microbatches=args.microbatches, **kw
        ),
        args.repeats,
    )
    tokens2 = [o.response_ids_R.tolist() for o in out2]
    return t1, tokens1, t2, tokens2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from megatron_vcap.parallel.multiprocess import run_on_ranks

    (t1, tokens1, t2, tokens2), _ = run_on_ranks(_run, 2, args, timeout=1800)
    assert tokens1 == tokens2, "PP=2 tokens differ from PP=1"
    n = sum(len(t) for t in tokens1)
    print(
        f"tiny GPT {args.layers} layers, hidden {args.hidden}, fp32, 1 thread per rank; "
        f"{args.prompts} prompts x G={args.group}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens; PP=2 with {args.microbatches} micro-batches"
    )
    print(
        f"PP=1 (1 rank): {n / t1:.1f} tokens/s ({t1:.2f} s) | PP=2 (2 ranks): {n / t2:.1f} "
        f"tokens/s ({t2:.2f} s) | PP=2/PP=1 = {t1 / t2:.2f}x (same tokens: yes)"
    )


if __name__ == "__main__":
    main()
