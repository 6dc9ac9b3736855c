"""vcap plan: the 7B recipe worked by hand (parameter counts from the published shapes, then
per-GPU memory and FLOPs with each formula written out here), layouts and verdicts, the JSON
shape, and `vcap train --check` printing the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_vcap.cli import main
from megatron_vcap.config.job import load_job_config
from megatron_vcap.plan.arch import KNOWN_SHAPES
from megatron_vcap.plan.cli import build_plan, check_verdict
from megatron_vcap.plan.estimate import Layout, build_workload, flops, memory

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs/qwen2_vl_7b_videocap_r1.yaml"

# Qwen2-VL-7B-Instruct (published config.json): h 3584, 28 layers, 28 heads, 4 KV groups of
# 128, SwiGLU 18944, vocab 152064 untied; vision 32 blocks of 1280, MLP 5120, merger to 3584.
H, L, KV, DH, F, V = 3584, 28, 4, 128, 18944, 152064
HV, LV, FV = 1280, 32, 5120
LM_LAYER = (H * (H + 2 * KV * DH) + (H + 2 * KV * DH)) + H * H + 3 * H * F + 2 * H
LM = L * LM_LAYER + 2 * V * H + H
VISION = 3 * 2 * 14 * 14 * HV + LV * (
    (3 * HV * HV + 3 * HV) + (HV * HV + HV) + (HV * FV + FV) + (FV * HV + HV) + 4 * HV
)
MERGER = 2 * HV + (4 * HV) ** 2 + 4 * HV + 4 * HV * H + H


def test_parameter_counts_by_hand():
    assert LM_LAYER == 233_057_792
    assert LM == 7_615_616_512  # Qwen2-7B's 7.62 B
    assert VISION == 631_183_360
    assert MERGER == 44_575_744
    m = KNOWN_SHAPES["qwen2-vl-7b"]
    assert (m.lm_params(), m.vision_params(), m.merger_params()) == (LM, VISION, MERGER)
    assert m.total_params() == 8_291_375_616  # the release's safetensors: 8,291,375,616


def test_7b_recipe_memory_and_flops_by_hand():
    cfg = load_job_config(RECIPE, [])
    w = build_workload(cfg)
    # Prompt: 32 frames -> 16 temporal patches x floor(151200 / 28^2) = 192 tokens, + 128 text.
    video = 16 * (151200 // 784)
    assert (w.video_tokens, w.prompt_tokens, w.response_tokens) == (video, video + 128, 1024)
    S = video + 128 + 1024  # 4224
    m = KNOWN_SHAPES["qwen2-vl-7b"]
    t, d, mbs = 2, 4, 2  # the recipe: TP=2 on 8 GPUs, micro-batches of 2, vision frozen
    mem = memory(m, w, Layout(tp=t, pp=1, dp=d))
    total_params, trainable = LM + VISION + MERGER, LM + MERGER
    weights = 2 * total_params / t  # bf16
    grads = 4 * trainable / t  # fp32 main grads
    optimizer = 12 * trainable / t / d  # fp32 params + Adam m, v; distributed optimizer
    per_token_layer = 2 * (4 * H + (2 * H + 2 * KV * DH + 3 * F) / t)  # no SP, no recompute
    activations = mbs * S * L * per_token_layer + mbs * 2 * 4 * S * V / t  # + fp32 logits, grad
    rows = 4 * 8  # rollout.prompts_per_batch (default 4) x G
    kv = rows * S * (2 * L * (KV / t) * DH * 2)
    kv_shared = (4 * (S - 1024) + rows * 1024) * (2 * L * (KV / t) * DH * 2)
    reference = 2 * total_params / t  # moved in for its pass (reference_on_cpu)
    total = weights + grads + optimizer + max(activations, kv, reference)
    expected = {
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "activations": activations,
        "kv_cache": kv,
        "kv_cache_shared_prefix": kv_shared,
        "reference": reference,
        "total": total,
    }
    for key, value in expected.items():
        assert mem[key] == pytest.approx(value, rel=1e-12), key
    # 8,291,375,616 + 15,320,384,512 + 11,490,288,384 + (44,326,453,248 + 10,277,093,376) / 2 B
    assert total == 62_403_821_824  # 58.12 GiB <= 0.9 x 80 GB = 67.06 GiB usable

    f = flops(m, w)
    fwd = 2 * LM * S + 2 * L * H * S**2  # LM forward, causal attention
    vision_fwd = 2 * VISION * (4 * video) + 4 * LV * HV * (4 * video) ** 2
    samples = 32 * 8
    assert f["train"] == pytest.approx(samples * (fwd + vision_fwd) * (3 + 1), rel=1e-12)
    P = S - 1024
    prefill = 32 * (2 * LM * P + 2 * L * H * P**2 + vision_fwd)  # once per prompt (shared)
    decode = samples * 1024 * (2 * LM + 4 * L * H * (P + 512))
    assert f["prefill"] == pytest.approx(prefill, rel=1e-12)
    assert f["decode"] == pytest.approx(decode, rel=1e-12)


def test_layouts_and_verdicts():
    cfg = load_job_config(RECIPE, [])
    p = build_plan(cfg, 1, 8, "h100-80gb", 0.35)
    # TP must divide 28 heads and 4 KV groups, PP the 28 layers (GRPO rollouts pipeline too).
    assert sorted((r["tp"], r["pp"], r["dp"]) for r in p["layouts"]) == [
        (1, 1, 8),
        (1, 2, 4),
        (1, 4, 2),
        (2, 1, 4),
        (2, 2, 2),
        (2, 4, 1),
        (4, 1, 2),
        (4, 2, 1),
    ]
    assert p["layouts"][0]["fits"]
    assert check_verdict(cfg, 8).startswith("plan (h100-80gb, TP=2 PP=1 DP=4): fits: 58.1")
    # Micro-batches of 4 (the recipe's previous value) do not fit on 80 GB.
    mbs4 = load_job_config(RECIPE, ["train.micro_batch_size=4"])
    assert check_verdict(mbs4, 8).startswith("plan (h100-80gb, TP=2 PP=1 DP=4): short by 16.5 GiB")
    fixed = load_job_config(RECIPE, ["model.recompute=full", "train.micro_batch_size=4"])
    assert "fits" in check_verdict(fixed, 8)
    assert "fits" in check_verdict(cfg, 8, "h200-141gb")


def test_plan_cli_json(capsys):
    rc = main(["plan", "--config", str(RECIPE), "--nodes", "2", "--gpus-per-node", "8", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["memory_gib"]) == {
        "weights", "grads", "optimizer", "activations", "kv_cache", "reference", "total"
    }  # fmt: skip
    assert out["gpus"] == 16 and {"train", "prefill", "decode", "total"} <= set(out["flops"])
    assert [(r["tp"], r["pp"], r["dp"]) for r in out["layouts"]][0] == (1, 4, 4)
    own = next(r for r in out["layouts"] if r["tp"] == 2)  # the config's TP=2, DP=8 here
    assert out["memory_gib"] == {k: own["memory_gib"][k] for k in out["memory_gib"]}


def test_train_check_prints_the_verdict(tmp_path, capsys):
    from tests.unit.test_validate_job import write_model_dir

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"id": "a"}\n')
    model = write_model_dir(tmp_path / "model")
    rc = main(["train", "--config", str(ROOT / "configs/demo_cpu.yaml"), "--check",
               "--world-size", "2", f"model.hf_path={model}",
               f"data.train_manifest={manifest}"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "config OK" in out
    assert "plan (h100-80gb, TP=1 PP=1 DP=2): fits:" in out, out
