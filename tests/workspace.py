"""A tiny GRPO job's inputs on disk, shared by the preemption and Slurm tests."""

from __future__ import annotations

from pathlib import Path


def tiny_grpo_workspace(root: Path) -> dict[str, str]:
    """Four synthetic videos and a 2-layer Qwen2.5-VL-architecture model folder under ``root``."""
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.presets import build_tiny_hf_model

    data = make_synthetic_dataset(root / "data", 4, seed=7, width=64, height=48, fps=4, seconds=2)
    model_dir = build_model_dir(
        root, data.tokenizer_dir, DemoSettings(hidden=64, layers=2, vision_depth=1)
    )
    build_tiny_hf_model(load_hf_config(model_dir), seed=4).save_pretrained(model_dir)
    return {"root": str(root), "model": str(model_dir), "manifest": str(data.manifest)}
