"""Kit section ``rollout``: ``tools/bench_generate.py`` on this device, figures into the report.

The benchmark (KV-cached Megatron decoding vs ``transformers`` ``generate`` on the same weights,
after a logits parity check; group-prefix sharing vs prefilling G copies; the GRPO rollout
workload) runs in bf16 with the SDPA core attention the trainer's local layers use, on a
Qwen2-style model of 1.5B-class widths on GPU (tiny in the dry run). Targets (the benchmark's):
ours / transformers >= 1 on both workloads, and a group-prefix speedup > 1 at G = 8.
"""

from __future__ import annotations

from tools.gpu.common import SectionContext, SectionResult

GPU = ["--dtype", "bf16", "--layers", "8", "--hidden", "2048", "--heads", "16",
       "--kv-heads", "2", "--ffn", "5632", "--vocab", "32000", "--prompts", "8",
       "--prompt-len", "512", "--new-tokens", "128", "--group-size", "8",
       "--share-prompt-len", "1024", "--share-new-tokens", "64", "--repeats", "2"]  # fmt: skip
DRY = ["--dtype", "fp32", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
       "--ffn", "128", "--vocab", "256", "--prompts", "2", "--prompt-len", "24",
       "--new-tokens", "8", "--group-size", "8", "--share-prompt-len", "32",
       "--share-new-tokens", "8", "--repeats", "1", "--threads", "1"]  # fmt: skip
CORE = "SDPA core attention"


def run(ctx: SectionContext) -> SectionResult:
    from tools import bench_generate

    res = SectionResult()
    argv = (DRY if ctx.dry_run else GPU) + ["--core-attention", "sdpa"]
    figures = bench_generate.main(argv)
    res.figures.update(figures, argv=" ".join(argv))
    parity = figures["parity_max_rel_diff"][CORE]
    tol = bench_generate.PARITY_TOL["fp32" if ctx.dry_run else "bf16"]
    res.check("logits parity before timing", parity <= tol, f"<= {tol}", value=parity)
    greedy = figures["greedy"][CORE]
    res.check("greedy tokens/s measured", greedy["tokens_per_s"] > 0, value=greedy["tokens_per_s"])
    res.figures["greedy_same_tokens"] = greedy["same_tokens"]
    res.target(
        "greedy: ours / transformers tokens/s", greedy["ratio"], ">= 1", greedy["ratio"] >= 1
    )
    grpo = figures["grpo_workload"][CORE]
    res.check(
        "GRPO workload tokens/s measured", grpo["tokens_per_s"] > 0, value=grpo["tokens_per_s"]
    )
    res.target("GRPO workload: ours / transformers tokens/s", grpo["ratio"], ">= 1",
               grpo["ratio"] >= 1)  # fmt: skip
    speedup = figures["prefix_sharing"][CORE]["whole_generation_speedup"]
    res.check("group-prefix speedup measured", speedup > 0, value=speedup)
    res.target("group-prefix speedup at G=8 (whole generation)", speedup, "> 1", speedup > 1)
    return res
