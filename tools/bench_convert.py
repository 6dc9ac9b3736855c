"""Benchmark HF <-> Megatron conversion: wall time and peak memory of both directions.

    python tools/bench_convert.py [--preset 1b|tiny] [--tp 1] [--pp 1] [--dtype bf16] [--work DIR]

Writes a random Qwen2.5-VL model of the preset's size (``1b``: ~1.0B parameters, a Qwen2-VL-2B-like
shape with fewer LM layers), then times ``vcap convert hf-to-mcore`` and ``vcap convert
mcore-to-hf``, each in a fresh process, sampling the memory (proportional set size) of that
process and all its children (the spawned conversion ranks, the checkpoint writer) every 0.1 s. Peaks are printed next to the baseline of
holding the whole model once (its weight bytes), as a ratio. It also checks that the round trip
is bit-identical. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRESETS = {
    # ~1.0B: LM 12 x 1536 (GQA 12/2 heads, SwiGLU 8960, tied 152k vocab), vision 8 x 1280.
    "1b": dict(
        vocab_size=151936,
        text_hidden_size=1536,
        text_intermediate_size=8960,
        text_num_hidden_layers=12,
        text_num_attention_heads=12,
        text_num_key_value_heads=2,
        text_rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        vision_depth=8,
        vision_hidden_size=1280,
        vision_intermediate_size=3420,
        vision_num_heads=16,
        vision_window_size=112,
        vision_fullatt_block_indexes=[3, 7],
        tie_word_embeddings=True,
    ),
    "tiny": dict(vocab_size=128),
}


def make_model_dir(out: str, preset: str, dtype: str) -> None:
    import torch

    from megatron_vcap.models.presets import build_tiny_processor, tiny_hf_config

    settings = dict(PRESETS[preset])
    config = tiny_hf_config("qwen2_5_vl", settings.pop("vocab_size"), **settings)
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    build_tiny_processor(config).save_pretrained(out)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def _tree_pss(proc) -> int:
    """Proportional set size of a process and its descendants: shared pages (mapped files,
    shared memory between the ranks and the checkpoint writer) are split between their users
    instead of counted once per process, so the sum is the memory the tree really holds."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; returns (seconds, peak memory (PSS) of its process tree, stdout)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watched, peak, done = psutil.Process(proc.pid), 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_pss(watched))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return seconds, peak, out


def weight_bytes(hf_dir: Path) -> int:
    return sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = load(a), load(b)
    return sorted(x) == sorted(y) and all(
        torch.equal(x[k].reshape(-1).view(torch.uint8), y[k].reshape(-1).view(torch.uint8))
        for k in x
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf output shard limit")
    p.add_argument("--work", help="working directory (default: a temporary one)")
    p.add_argument("--make-only", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_only:
        make_model_dir(args.make_only, args.preset, args.dtype)
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_convert_"))
    results = {preset: bench(work / preset, preset, args) for preset in ("tiny", args.preset)}
    params, size, rows, identical = results[args.preset]
    _, _, fixed, _ = results["tiny"]
    gib = 2**30
    print(
        f"model: {params / 1e9:.2f}B parameters, {args.dtype}, {size / gib:.2f} GiB of weights; "
        f"hf-to-mcore at TP={args.tp} PP={args.pp}; mcore-to-hf shards <= {args.max_shard_size}"
    )
    print(
        "baselines: 'model' = holding the weights once; 'fixed' = the same run on the tiny "
        "preset (interpreter, torch, Megatron, helper processes)"
    )
    header = ("direction", "time (s)", "peak (GiB)", "fixed (GiB)", "(peak-fixed)/model")
    print(f"{header[0]:<13}{header[1]:>10}{header[2]:>12}{header[3]:>13}{header[4]:>20}")
    for (name, seconds, peak), (_, _, base) in zip(rows, fixed):
        print(
            f"{name:<13}{seconds:>10.1f}{peak / gib:>12.2f}{base / gib:>13.2f}"
            f"{(peak - base) / size:>20.2f}"
        )
    print("round trip bit-identical:", identical)
    print(f"files in {work}")
    return 0


def bench(work: Path, preset: str, args):
    """Make the model dir, convert both ways; (params, weight bytes, rows, bit-identical)."""
    hf, ckpt, back = work / "hf", work / "ckpt", work / "hf_back"
    make = [sys.executable, __file__, "--make-only", str(hf), "--preset", preset]
    _, _, out = run_measured([*make, "--dtype", args.dtype])
    params = json.loads(out.strip().splitlines()[-1])["params"]
    vcap = [sys.executable, "-m", "megatron_vcap", "convert"]
    to_mcore = [*vcap, "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt)]
    to_mcore += ["--tp", str(args.tp), "--pp", str(args.pp)]
    to_hf = [*vcap, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)]
    to_hf += ["--max-shard-size", args.max_shard_size]
    rows = [
        (name, *run_measured(cmd)[:2])
        for name, cmd in (("hf-to-mcore", to_mcore), ("mcore-to-hf", to_hf))
    ]
    return params, weight_bytes(hf), rows, same_tensors(hf, back)


if __name__ == "__main__":
    sys.exit(main())
