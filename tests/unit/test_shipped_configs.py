"""Every shipped recipe loads and validates (and fits the layout it was written for)."""

from pathlib import Path

import pytest

from megatron_vcap.config.job import load_job_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    cfg = load_job_config(path, world_size=8 if "7b" in path.name else 2)
    assert cfg.train.mode in ("grpo", "sft")


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
