"""``vcap eval reward``'s entry on one rank: streams the manifest a batch at a time, scores every
sample once, writes the summary and the per-sample records."""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(900)
def test_evaluate_main_decodes_one_batch_at_a_time(tmp_path, single_rank, monkeypatch):
    import megatron_vcap.data.vision as vision
    import megatron_vcap.eval.reward_eval as reward_eval
    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.convert.checkpoint import save_model_checkpoint
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir, recipe_path
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.testing.fake_openai import FakeOpenAIServer

    data = make_synthetic_dataset(tmp_path / "data", 3, seed=2, width=48, height=32, fps=4,
                                  seconds=1)  # fmt: skip
    model_dir = build_model_dir(tmp_path, data.tokenizer_dir, DemoSettings(hidden=32, layers=1,
                                                                           vision_depth=1))  # fmt: skip
    model = build_qwen_vl_model(
        load_hf_config(model_dir), ModelConfig(params_dtype="fp32", transformer_impl="local")
    )
    save_model_checkpoint(tmp_path / "ckpt", model, model_dir)

    decoded, batches = [], []
    real_decode, real_items = vision.process_sample_video, reward_eval.evaluate_items
    monkeypatch.setattr(vision, "process_sample_video",
                        lambda *a, **k: decoded.append(1) or real_decode(*a, **k))  # fmt: skip

    def items_spy(model, items, *args, **kwargs):
        batches.append((len(items), len(decoded)))
        return real_items(model, items, *args, **kwargs)

    monkeypatch.setattr(reward_eval, "evaluate_items", items_spy)
    with FakeOpenAIServer() as server:
        cfg = load_job_config(
            recipe_path(),
            [
                "data.max_frames=4",
                "data.min_pixels=784",
                "data.max_pixels=3136",
                "rollout.max_new_tokens=6",
                "judge.kind=openai",
                f"judge.base_url={server.base_url}",
                "judge.api_key_env=VCAP_NO_SUCH_KEY",
            ],
        )
        out = tmp_path / "eval.json"
        summary = reward_eval.evaluate_main(
            cfg, str(tmp_path / "ckpt"), str(data.manifest), str(out), batch_size=2
        )
    # Two batches (2 + 1 samples), each decoded just before it is evaluated.
    assert batches == [(2, 2), (1, 3)]
    written = json.loads(out.read_text())
    assert summary["num_samples"] == 3 == len(written["samples"])
    assert written["summary"] == summary
    assert [s["id"] for s in written["samples"]] == [f"synth_{i:05d}" for i in range(3)]
