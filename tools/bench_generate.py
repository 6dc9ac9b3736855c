"""Benchmark rollout generation: our KV-cached Megatron decoding vs ``transformers`` ``generate``,
and group-prefix sharing vs prefilling every sample's copy of the prompt.

Both sides run the same tiny random Qwen2 text model: a ``Qwen2ForCausalLM`` is built from a
config and its weights are copied into a Megatron ``GPTModel`` (mRoPE, local spec; fused QKV laid
out per query group, ``linear_fc1 = [gate; up]``). A logits parity check runs first. Ours is timed
with Megatron's local ``DotProductAttention`` and with an SDPA core attention (``--core-attention``;
see ``megatron_vcap/testing/tiny_gpt.py``), the HF model with its default (SDPA) attention. Then:

1. greedy decoding of P prompts, same batch, both stopping only at ``--new-tokens``: generated
   tokens per second of each and the ratio ours / transformers (target >= 1.0), plus the share
   of prompts whose tokens agree exactly;
2. G = ``--group-size`` samples per prompt with ``share_prefix`` on and off: wall time of the
   whole generation and of the prefill alone (``max_new_tokens=1``), as speedups;
3. the GRPO rollout workload itself: P prompts x G samples at temperature 1 with EOS ids, ours
   (prefix shared once per group, finished rows dropped) vs ``generate(num_return_sequences=G)``
   (prefills G copies, computes finished rows until the longest ends), in generated tokens/s.

Each timing is the best of ``--repeats`` runs after one warm-up, in this one process; in [1] and
[3] the contenders run in turn within each repeat, so load bursts from other processes hit all.
Usage: ``python tools/bench_generate.py [--device cuda] [--dtype bf16] [--layers 4 --hidden 256 ...]``
(``main`` also returns the figures as a dict: the GPU kit, ``tools/gpu/rollout.py``, reads them).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Max |ours - transformers| logit difference relative to max(1, max |logit|), per dtype: a wrong
# weight copy gives O(1); bf16 rounding (accumulation order, norm precision) gives ~1e-2.
PARITY_TOL = {"fp32": 1e-3, "bf16": 0.1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="both models' dtype")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--share-prompt-len", type=int, default=384)
    p.add_argument("--share-new-tokens", type=int, default=32)
    p.add_argument(
        "--eos-fraction",
        type=float,
        default=0.02,
        help="share of the vocabulary used as EOS ids in the GRPO workload",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default="1,2,3", help="which measurements to run")
    p.add_argument(
        "--core-attention",
        default="local,sdpa",
        help="Megatron attention cores to time, comma-separated: local, sdpa",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1 keeps timings stable on a shared machine)",
    )
    return p.parse_args(argv)


def build_hf(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    with torch.device(args.device):  # built where it runs: CPU init of a large model is slow
        model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF init gives zero biases; random ones make the QKV-bias copy count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.02)
    return model


def copy_hf_to_megatron(hf, mg, args) -> None:
    """Qwen2 HF weights -> Megatron GPTModel (TP=1): per-group fused QKV, [gate; up] fc1."""
    groups, per_group = args.kv_heads, args.heads // args.kv_heads
    head_dim = args.hidden // args.heads
    target = dict(mg.named_parameters())

    def fuse_qkv(q, k, v):
        tail = q.shape[1:]
        q = q.reshape(groups, per_group * head_dim, *tail)
        k, v = k.reshape(groups, head_dim, *tail), v.reshape(groups, head_dim, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)

    src = {"embedding.word_embeddings.weight": hf.model.embed_tokens.weight,
           "decoder.final_layernorm.weight": hf.model.norm.weight,
           "output_layer.weight": hf.lm_head.weight}  # fmt: skip
    for i, layer in enumerate(hf.model.layers):
        pre, att, mlp = f"decoder.layers.{i}.", layer.self_attn, layer.mlp
        src[pre + "input_layernorm.weight"] = layer.input_layernorm.weight
        src[pre + "pre_mlp_layernorm.weight"] = layer.post_attention_layernorm.weight
        src[pre + "self_attention.linear_qkv.weight"] = fuse_qkv(
            att.q_proj.weight, att.k_proj.weight, att.v_proj.weight
        )
        src[pre + "self_attention.linear_qkv.bias"] = fuse_qkv(
            att.q_proj.bias, att.k_proj.bias, att.v_proj.bias
        )
        src[pre + "self_attention.linear_proj.weight"] = att.o_proj.weight
        src[pre + "mlp.linear_fc1.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        src[pre + "mlp.linear_fc2.weight"] = mlp.down_proj.weight
    if set(src) != set(target):
        raise RuntimeError(f"weight names differ: {sorted(set(src) ^ set(target))}")
    with torch.no_grad():
        for name, value in src.items():
            target[name].copy_(value)


def build_megatron(args, core_attention="local"):
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.parallel.runtime import init_distributed
    from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    init_distributed(ParallelConfig(), seed=0)  # idempotent: a second model reuses the groups
    half = args.hidden // args.heads // 2  # the (t, h, w) split of Qwen2-VL, scaled to head_dim
    section = [half // 2, half // 4, half - half // 2 - half // 4]
    cfg = TinyGPTConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        ffn_hidden_size=args.ffn,
        vocab_size=args.vocab,
        max_sequence_length=4096,
        mrope_section=section,
        rotary_base=10000,
        core_attention=core_attention,
        dtype=DTYPES[args.dtype],
    )
    return build_tiny_mrope_gpt(cfg)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    """Best (minimum) wall time of ``repeats`` runs after a warm-up, and the last result: the
    minimum is the estimate least disturbed by other processes on a shared machine."""
    best, out = timed_interleaved({"fn": fn}, repeats)
    return best["fn"], out["fn"]


def timed_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """``timed`` for several contenders, run in turn within each repeat (a, b, c, a, b, c, ...),
    so that a burst of load from other processes hits all of them rather than the one that
    happened to be running: best seconds per name and each one's last result."""
    for fn in fns.values():
        fn()  # warm-up (allocator, kernels, lazy init)
    best, out = dict.fromkeys(fns, float("inf")), {}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            out[name] = fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, out


def hf_generate(hf, prompts, new_tokens, device, **sampling):
    """Left-padded batch with an attention mask: the standard transformers batching. Runs
    without our CPU device redirect (``parallel/cpu_compat``), which ``init_distributed``
    installs for the Megatron side: under it every torch op of ``generate`` paid a Python call
    (~17% of its time at the default sizes), a handicap a plain transformers user does not have."""
    from megatron_vcap.parallel.cpu_compat import device_redirect_suspended

    width = max(p.length for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.length :] = p.input_ids_S
        mask[b, width - p.length :] = 1
    sampling = sampling or dict(do_sample=False, min_new_tokens=new_tokens)
    with device_redirect_suspended():
        out = hf.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            pad_token_id=0,
            **sampling,
        )
    return out[:, width:].cpu()


def make_prompts(count, length, vocab, seed):
    from megatron_vcap.rollout.types import PromptSpec

    g = torch.Generator().manual_seed(seed)
    lengths = [length - (i * 7) % 16 for i in range(count)]  # a little ragged, like real prompts
    return [PromptSpec.from_text_ids(torch.randint(1, vocab, (n,), generator=g)) for n in lengths]


def bench_vs_transformers(hf, models, args):
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams

    prompts = make_prompts(args.prompts, args.prompt_len, args.vocab, seed=1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    total = args.prompts * args.new_tokens
    fns = {"transformers": lambda: hf_generate(hf, prompts, args.new_tokens, args.device)}
    for name, mg in models.items():
        fns[name] = lambda mg=mg: generate(mg, prompts, sampling=greedy)
    with torch.no_grad():
        best, outs = timed_interleaved(fns, args.repeats)
    hf_s, theirs = best["transformers"], outs["transformers"]
    print(f"[1] greedy, {args.prompts} prompts x {args.new_tokens} new tokens "
          f"(prompt ~{args.prompt_len} tokens), same batch, timed in turn")  # fmt: skip
    print(f"    transformers generate          : {total / hf_s:8.1f} tokens/s ({hf_s:.3f} s)")
    out = {"transformers_tokens_per_s": total / hf_s}
    for name in models:
        ours_s, ours = best[name], outs[name]
        agree = sum(o.response_ids_R.tolist() == t.tolist() for o, t in zip(ours, theirs))
        print(f"    ours, {name:24s} : {total / ours_s:8.1f} tokens/s ({ours_s:.3f} s)  "
              f"ratio {hf_s / ours_s:.2f}x (target >= 1.0); same tokens {agree}/{len(prompts)}")  # fmt: skip
        out[name] = {"tokens_per_s": total / ours_s, "ratio": hf_s / ours_s,
                     "same_tokens": agree / len(prompts)}  # fmt: skip
    return out


def bench_prefix_sharing(models, args):
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams

    prompts = make_prompts(args.prompts, args.share_prompt_len, args.vocab, seed=2)
    G = args.group_size
    print(f"[2] group-prefix sharing vs {args.prompts * G} prefilled copies, {args.prompts} prompts"
          f" x G={G}, prompt ~{args.share_prompt_len} tokens, T=1.0")  # fmt: skip
    out = {}
    for name, mg in models.items():
        for label, new in (("whole generation", args.share_new_tokens), ("prefill only", 1)):
            params = SamplingParams(temperature=1.0, max_new_tokens=new)
            t = {}
            for share in (True, False):
                t[share], _ = timed(
                    lambda share=share, params=params, mg=mg: generate(
                        mg, prompts, sampling=params, group_size=G, seed=0, share_prefix=share
                    ),
                    args.repeats,
                )
            print(f"    ours, {name:24s} {label:16s} ({new:3d} new): shared {t[True]:.3f} s, "
                  f"copies {t[False]:.3f} s -> speedup {t[False] / t[True]:.2f}x")  # fmt: skip
            out.setdefault(name, {})[label.replace(" ", "_") + "_speedup"] = t[False] / t[True]
    return out


def count_until_eos(rows, eos):
    eos_t = torch.tensor(eos)
    total = 0
    for row in rows:
        hit = torch.isin(row, eos_t).nonzero()
        total += int(hit[0]) + 1 if hit.numel() else row.numel()
    return total


def bench_grpo_workload(hf, models, args):
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams

    prompts = make_prompts(args.prompts, args.share_prompt_len, args.vocab, seed=3)
    G, N = args.group_size, args.share_new_tokens
    eos = list(range(1, 1 + max(1, int(args.eos_fraction * args.vocab))))
    params = SamplingParams(temperature=1.0, max_new_tokens=N, eos_token_ids=eos)
    hf_sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       num_return_sequences=G, eos_token_id=eos)  # fmt: skip
    fns = {"transformers": lambda: hf_generate(hf, prompts, N, args.device, **hf_sampling)}
    for name, mg in models.items():
        fns[name] = lambda mg=mg: generate(mg, prompts, sampling=params, group_size=G, seed=0)
    with torch.no_grad():
        best, outs = timed_interleaved(fns, args.repeats)
    hf_s = best["transformers"]
    hf_rate = count_until_eos(outs["transformers"], eos) / hf_s
    print(f"[3] GRPO rollout workload, {args.prompts} prompts x G={G}, prompt "
          f"~{args.share_prompt_len} tokens, <= {N} new tokens, T=1.0, EOS p~{args.eos_fraction}")  # fmt: skip
    print(f"    transformers (num_return_sequences): {hf_rate:8.1f} tokens/s ({hf_s:.3f} s)")
    out = {"transformers_tokens_per_s": hf_rate}
    for name in models:
        ours_s = best[name]
        rate = sum(o.num_tokens for o in outs[name]) / ours_s
        print(f"    ours, {name:24s}     : {rate:8.1f} tokens/s ({ours_s:.3f} s)  "
              f"ratio {rate / hf_rate:.2f}x (target >= 1.0)")  # fmt: skip
        out[name] = {"tokens_per_s": rate, "ratio": rate / hf_rate}
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = build_hf(args).to(args.device, DTYPES[args.dtype])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, threads {torch.get_num_threads()}, load average {load:.1f}, "
          f"layers {args.layers}, hidden {args.hidden}, vocab {args.vocab}")  # fmt: skip
    models, results = {}, {"parity_max_rel_diff": {}}
    for core in args.core_attention.split(","):
        mg = build_megatron(args, core).to(args.device)
        copy_hf_to_megatron(hf, mg, args)
        ids = torch.randint(0, args.vocab, (2, 40), device=args.device)
        pos = torch.arange(40, device=args.device).expand(3, 2, 40)
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.float()
            diff = (mg(ids, pos, None).float() - ref).abs().max().item()
        diff /= max(1.0, ref.abs().max().item())
        label = {"local": "local DotProductAttention", "sdpa": "SDPA core attention"}[core]
        print(f"    {label}: logits vs transformers max relative diff {diff:.2e}")
        if diff > PARITY_TOL[args.dtype]:
            raise SystemExit("weight copy is wrong: logits differ; timings would be meaningless")
        models[label] = mg
        results["parity_max_rel_diff"][label] = diff
    sections = set(args.sections.split(","))
    if "1" in sections:
        results["greedy"] = bench_vs_transformers(hf, models, args)
    if "2" in sections:
        results["prefix_sharing"] = bench_prefix_sharing(models, args)
    if "3" in sections:
        results["grpo_workload"] = bench_grpo_workload(hf, models, args)
    return results


if __name__ == "__main__":
    main()
