"""Packed (THD) vs padded training passes: the share of computed tokens that are real, step time.

Two length distributions, each as GRPO micro-batches (one prompt, its G responses):

* ``demo``: the CPU demo's rollouts: prompt and response token counts of a ``vcap demo --out
  DIR`` run (``--demo-run DIR``: its GRPO rollout logs, responses re-tokenised with its
  tokenizer, prompts rebuilt from its manifest);
* ``7b``: VideoCap-R1-shaped: a ~3k-token video prompt (2 fps x 32 frames at 360 x 420 gives
  ~2.9k video tokens), responses uniform in [50, 1024].

For each, the same model (a tiny GPT with a few layers, local layers with the SDPA core, fp32,
CPU) runs one GRPO forward + backward per micro-batch padded and packed, side by side in this
process; the figures are medians of ``--repeats`` runs. Usage:

    python tools/bench_packing.py [--demo-run runs/demo] [--layers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _demo_groups(run_dir: Path) -> list[tuple[int, list[int]]]:
    """(prompt tokens, response tokens per sample) per GRPO group of a ``vcap demo`` run: the
    rollout logs' responses re-tokenised (+1 for the stop token the log strips), the prompts
    rebuilt by the data pipeline from the run's manifest and config."""
    from transformers import AutoTokenizer

    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.data.manifest import load_manifest
    from megatron_vcap.eval.reward_eval import _prepare

    cfg = load_job_config(run_dir / "grpo" / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "model"))
    groups: dict[tuple[int, int, str], list[int]] = {}
    for log in sorted((run_dir / "grpo" / "rollouts").glob("dp_rank_*.jsonl")):
        for line in log.read_text().splitlines():
            r = json.loads(line)
            n = len(tokenizer(r["response"], add_special_tokens=False)["input_ids"])
            key = (r["step"], int(log.stem.split("_")[-1]), r["sample_id"])
            groups.setdefault(key, []).append(n + (r["finish_reason"] != "length"))
    wanted = {k[2] for k in groups}
    samples = [s for s in load_manifest(cfg.data.train_manifest) if s.id in wanted]
    prompt_len = {
        it.sample.id: len(it.prompt.input_ids) for it in _prepare(samples, cfg.data, tokenizer)
    }
    return [(prompt_len[k[2]], v) for k, v in sorted(groups.items())]


def _micro_batches(groups, vocab, seed):
    """GRPO micro-batches, one prompt + its G responses each, as the trainer builds them."""
    from megatron_vcap.rl.records import Rollout, build_train_batch
    from megatron_vcap.rollout.types import PromptSpec

    g = torch.Generator().manual_seed(seed)
    rollouts, prompts = [], []
    for p, (prompt_len, responses) in enumerate(groups):
        prompts.append(
            PromptSpec.from_text_ids(torch.randint(0, vocab, (prompt_len,), generator=g))
        )
        for i, r in enumerate(responses):
            out = SimpleNamespace(
                prompt_index=p,
                sample_index=i,
                response_ids_R=torch.randint(0, vocab, (r,), generator=g),
                finish_reason="eos",
                logprobs_R=None,
            )
            rollouts.append(Rollout.from_generation(out, prompts[p], f"{p}/{i}"))
    batch = build_train_batch(rollouts, prompts, torch.randn(len(rollouts), generator=g))
    return batch.micro_batches(len(groups[0][1]))


def _step(model, micro_batches, pack: bool) -> float:
    from megatron_vcap.rl.engine import grpo_loss_fn, run_microbatches

    cfg = SimpleNamespace(
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_beta=0.0,
        kl_estimator="k3",
        loss_aggregation="token_mean",
        tis_cap=None,
    )
    loss_fn = grpo_loss_fn(cfg, tp_group=None, temperature=1.0, normaliser=1000.0, undo_averaging=1)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    run_microbatches(model, micro_batches, loss_fn, forward_only=False, pack=pack)
    return time.perf_counter() - t0


def _measure(name, model, micro_batches, repeats):
    from megatron_vcap.rl.packing import computed_tokens

    real = sum(int(mb.seq_len_B.sum()) for mb in micro_batches)
    padded_tokens = sum(
        computed_tokens(mb.seq_len_B, mb.tokens_BT.shape[1], packed=False) for mb in micro_batches
    )
    times = {True: [], False: []}
    for _ in range(repeats):
        for pack in (False, True):
            times[pack].append(_step(model, micro_batches, pack))
    t_pad, t_pack = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"{name}: {len(micro_batches)} micro-batches, {real} real tokens | real share of computed "
        f"tokens: padded {real / padded_tokens:.3f}, packed 1.000 | computed tokens packed/padded "
        f"{real / padded_tokens:.3f} | step time padded {t_pad:.3f} s, packed {t_pack:.3f} s, "
        f"packed/padded {t_pack / t_pad:.3f} (speedup {t_pad / t_pack:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-run", type=Path, default=None)
    ap.add_argument("--demo-groups", type=int, default=16, help="GRPO groups of the demo run")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts-7b", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.parallel.runtime import init_distributed
    from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    init_distributed(ParallelConfig(), seed=args.seed)
    torch.manual_seed(args.seed)
    vocab = 512
    cfg = TinyGPTConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=4 * args.hidden,
        vocab_size=vocab,
        max_sequence_length=8192,
        mrope_section=[args.hidden // 16, args.hidden // 32, args.hidden // 32],
        core_attention="sdpa",
    )
    model = build_tiny_mrope_gpt(cfg).train()
    print(
        f"model: tiny GPT, {args.layers} layers, hidden {args.hidden}, fp32, CPU threads "
        f"{torch.get_num_threads()}; G = {args.group}; medians of {args.repeats} repeats"
    )

    if args.demo_run is not None:
        groups = _demo_groups(args.demo_run)[: args.demo_groups]
        lens = [r for _, rs in groups for r in rs]
        print(
            f"demo run {args.demo_run}: {len(groups)} groups, prompt tokens "
            f"{min(p for p, _ in groups)}-{max(p for p, _ in groups)}, response tokens "
            f"{min(lens)}-{max(lens)} (mean {statistics.mean(lens):.0f})"
        )
        _measure("demo", model, _micro_batches(groups, vocab, 1), args.repeats)
    else:
        print("demo: skipped (pass --demo-run DIR of a `vcap demo --out DIR` run)")
    g = torch.Generator().manual_seed(args.seed)
    groups_7b = [
        (
            int(torch.randint(2900, 3101, (1,), generator=g)),
            torch.randint(50, 1025, (args.group,), generator=g).tolist(),
        )
        for _ in range(args.prompts_7b)
    ]
    _measure("7b-shaped", model, _micro_batches(groups_7b, vocab, 2), args.repeats)


if __name__ == "__main__":
    main()
