"""``mcore-to-hf`` output is usable as it is: ``AutoProcessor`` + ``AutoModelForImageTextToText``
load it and ``generate`` runs on a demo video.

The demo's tiny model folder (with random weights) goes HF -> Megatron -> HF. The processor
written into the export must be the one training used: its prompt ids and video patch grid for
a real synthetic MP4 equal those of our own data pipeline (which ``test_data_prompts.py`` checks
against the transformers processor). A checkpoint whose folder has no processor files still
exports with default ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch


def hf_generate_on_video(hf_dir, video_path, video, instruction: str, max_new_tokens: int):
    """transformers alone: load ``hf_dir``, build the prompt with its processor's chat template,
    greedy-generate; returns (processor inputs, generated ids)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megatron_vcap.data.prompts import video_messages
    from megatron_vcap.data.video_io import read_video_frames

    processor = AutoProcessor.from_pretrained(str(hf_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    frames, _, _ = read_video_frames(str(video_path), lambda meta: video.frame_indices)
    text = processor.apply_chat_template(video_messages(instruction), add_generation_prompt=True)
    inputs = processor(
        text=[text],
        videos=[frames],
        videos_kwargs={
            "do_sample_frames": False,
            "video_metadata": [{"fps": video.sampled_fps, "total_num_frames": len(frames)}],
        },
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs, out[0, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def export(tmp_path_factory, single_rank):
    from megatron_vcap.convert.hf_to_mcore import convert_on_this_rank
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_vcap.data.manifest import load_manifest
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.presets import build_tiny_hf_model

    root = tmp_path_factory.mktemp("hf_export")
    data = make_synthetic_dataset(root / "data", 1, seed=4, width=96, height=72, fps=4, seconds=2)
    model_dir = build_model_dir(root, data.tokenizer_dir, DemoSettings(hidden=64, layers=2))
    build_tiny_hf_model(load_hf_config(model_dir), seed=2).save_pretrained(model_dir)
    convert_on_this_rank(str(model_dir), str(root / "ckpt"), 1, 1, progress=False)
    out = convert_mcore_to_hf(root / "ckpt", root / "export", progress=False)
    return {"root": root, "out": out, "sample": load_manifest(data.manifest)[0]}


def test_export_generates_with_transformers_on_a_demo_video(export):
    import yaml
    from transformers import AutoTokenizer

    from megatron_vcap.data.prompts import STRUCTURED_THINKING_INSTRUCTION, build_prompt
    from megatron_vcap.data.vision import process_video
    from megatron_vcap.demo.demo import recipe_path

    out, sample = export["out"], export["sample"]
    for name in ("processor_config.json", "tokenizer.json", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    data_cfg = yaml.safe_load(recipe_path().read_text())["data"]
    pixels = {"min_pixels": data_cfg["min_pixels"], "max_pixels": data_cfg["max_pixels"]}
    video = process_video(sample.video, fps=data_cfg["fps"], max_frames=data_cfg["max_frames"],
                          **pixels)  # fmt: skip
    inputs, new_ids = hf_generate_on_video(
        out, sample.video, video, STRUCTURED_THINKING_INSTRUCTION, max_new_tokens=12
    )
    ours = build_prompt(AutoTokenizer.from_pretrained(str(out)), video)
    assert inputs["input_ids"][0].tolist() == ours.input_ids.tolist()
    assert inputs["video_grid_thw"].tolist() == video.video_grid_thw.tolist()
    torch.testing.assert_close(inputs["pixel_values_videos"], video.pixel_values_videos,
                               atol=1e-5, rtol=0)  # fmt: skip
    assert 1 <= new_ids.numel() <= 12


def test_checkpoint_without_processor_files_exports_default_ones(export, caplog):
    from transformers import AutoProcessor

    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    root = export["root"]
    bare = root / "ckpt_bare"
    shutil.copytree(root / "ckpt", bare)
    (bare / "hf" / "processor_config.json").unlink()
    with caplog.at_level(logging.WARNING):
        out = convert_mcore_to_hf(bare, root / "export_bare", progress=False)
    assert any("no processor files" in r.getMessage() for r in caplog.records)
    config = json.loads((out / "processor_config.json").read_text())
    assert config["video_processor"]["merge_size"] == 2
    assert config["video_processor"]["temporal_patch_size"] == 2
    processor = AutoProcessor.from_pretrained(str(out))
    assert (
        processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        == json.loads((Path(out) / "config.json").read_text())["video_token_id"]
    )
