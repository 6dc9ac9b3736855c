"""Every shipped recipe passes validate_job at the layout it was written for.

The recipes name cluster paths (/models/..., /data/...), so the test points them at stand-ins:
a one-line manifest and a model folder whose config.json has the real architecture's sizes (the
numbers published with Qwen2-VL-7B / Qwen2.5-VL-7B), so the TP x PP split is checked against the
model each recipe is for.
"""

from pathlib import Path

import pytest

from megatron_vcap.config.job import load_job_config, validate_job

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))

_TEXT_7B = dict(
    text_vocab_size=152064,
    text_hidden_size=3584,
    text_intermediate_size=18944,
    text_num_hidden_layers=28,
    text_num_attention_heads=28,
    text_num_key_value_heads=4,
    text_rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
ARCHITECTURES = {
    "qwen2_vl_7b": (
        "qwen2_vl",
        dict(
            _TEXT_7B,
            vision_depth=32,
            vision_embed_dim=1280,
            vision_num_heads=16,
            vision_mlp_ratio=4,
        ),
    ),  # fmt: skip
    "qwen2_5_vl_7b": (
        "qwen2_5_vl",
        dict(
            _TEXT_7B,
            vision_depth=32,
            vision_hidden_size=1280,
            vision_intermediate_size=3420,
            vision_num_heads=16,
            vision_window_size=112,
            vision_fullatt_block_indexes=[7, 15, 23, 31],
            vision_tokens_per_second=2,
        ),
    ),  # fmt: skip
    "qwen2_5_vl_72b": (
        "qwen2_5_vl",
        dict(
            _TEXT_7B,
            text_hidden_size=8192,
            text_intermediate_size=29568,
            text_num_hidden_layers=80,
            text_num_attention_heads=64,
            text_num_key_value_heads=8,
            vision_depth=32,
            vision_hidden_size=1280,
            vision_intermediate_size=3456,
            vision_num_heads=16,
            vision_window_size=112,
            vision_fullatt_block_indexes=[7, 15, 23, 31],
            vision_tokens_per_second=2,
        ),
    ),  # fmt: skip
    # The demo's tiny model (demo.DemoSettings: hidden 128, 3 layers, 8 heads, 2 KV heads).
    "demo_cpu": (
        "qwen2_5_vl",
        dict(
            text_hidden_size=128,
            text_intermediate_size=256,
            text_num_hidden_layers=3,
            text_num_attention_heads=8,
            text_num_key_value_heads=2,
        ),
    ),  # fmt: skip
}
# Ranks each recipe is written for (the 7B ones: one node of 8 GPUs; 72B: 4 nodes of 8).
WORLD_SIZE = {"demo_cpu": 2, "qwen2_5_vl_72b": 32}


def _arch_of(path: Path) -> str:
    for name in ARCHITECTURES:
        if path.name.startswith(name):
            return name
    raise AssertionError(f"{path.name}: add its architecture's sizes to ARCHITECTURES")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "train.jsonl"
    path.write_text('{"id": "stand-in"}\n')
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_passes_validate_job(path, manifest, tmp_path):
    from megatron_vcap.models.presets import tiny_hf_config

    name = _arch_of(path)
    arch, dims = ARCHITECTURES[name]
    dims = dict(dims)
    vocab = dims.pop("text_vocab_size", 128)
    model = tmp_path / "model"
    model.mkdir()
    tiny_hf_config(arch, vocab_size=vocab, **dims).save_pretrained(str(model))
    (model / "tokenizer.json").write_text("{}")  # only its presence is checked
    cfg = load_job_config(path, [f"model.hf_path={model}", f"data.train_manifest={manifest}"])
    world = WORLD_SIZE.get(name, 8)
    check = validate_job(cfg, world)
    assert check.world_size == world and check.dp_size >= 1
    # The same recipe on one rank fewer than its layout needs is refused.
    if cfg.parallel.tensor_model_parallel_size > 1:
        with pytest.raises(ValueError, match="not divisible"):
            validate_job(cfg, world - 1)


def test_paper_recipe_matches_the_paper():
    cfg = load_job_config(ROOT / "configs/qwen2_vl_7b_videocap_r1.yaml", world_size=8)
    r = cfg.reward
    assert (r.w_format, r.w_think, r.w_caption) == (1.0, 1.0, 1.0)
    assert (r.caption_score, r.escore_mode, r.escore_delta1, r.escore_delta2) == (
        "escore",
        "step",
        0.28,
        0.35,
    )
    assert cfg.data.max_pixels == 360 * 420 and cfg.data.max_frames == 32
    assert cfg.grpo.group_size == 8 and cfg.parallel.pipeline_model_parallel_size == 1
