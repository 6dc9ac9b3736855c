"""Real Qwen2-VL / Qwen2.5-VL sizes: hub-style config.json files load, describe and map.

The configs are written here in the flat transformers-4.x layout the hub checkpoints ship
(values from the published config.json files); no weights are involved. For each size the
mapping table must cover exactly the tensors of the transformers model (built on the meta
device) and the Megatron configs must build.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_vcap.models.hf_config import describe_hf_config, load_hf_config

_COMMON = dict(
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
    image_token_id=151655,
    video_token_id=151656,
    hidden_act="silu",
    max_position_embeddings=128000,
    rms_norm_eps=1e-06,
    rope_theta=1000000.0,
    use_sliding_window=False,
    torch_dtype="bfloat16",
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
# (hidden, intermediate, layers, heads, kv heads, vocab, tied)
_LM = {
    "qwen2_vl-2b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2_vl-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2_vl-72b": (8192, 29568, 80, 64, 8, 152064, False),
    "qwen2_5_vl-3b": (2048, 11008, 36, 16, 2, 151936, True),
    "qwen2_5_vl-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2_5_vl-32b": (5120, 27648, 64, 40, 8, 152064, False),
    "qwen2_5_vl-72b": (8192, 29568, 80, 64, 8, 152064, False),
}


def hub_config(name: str) -> dict:
    arch = name.split("-")[0]
    hidden, ffn, layers, heads, kv, vocab, tied = _LM[name]
    vision = dict(
        depth=32,
        num_heads=16,
        in_chans=3,
        patch_size=14,
        spatial_merge_size=2,
        spatial_patch_size=14,
        temporal_patch_size=2,
    )
    if arch == "qwen2_vl":
        vision.update(embed_dim=1280, mlp_ratio=4, hidden_size=hidden)
    else:
        vision.update(
            hidden_act="silu",
            hidden_size=1280,
            intermediate_size=3420,
            out_hidden_size=hidden,
            window_size=112,
            tokens_per_second=2,
            fullatt_block_indexes=[7, 15, 23, 31],
        )
    return dict(
        _COMMON,
        architectures=[
            "Qwen2VLForConditionalGeneration"
            if arch == "qwen2_vl"
            else "Qwen2_5_VLForConditionalGeneration"
        ],
        model_type=arch,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        vision_config=vision,
    )


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("name", sorted(_LM))
def test_hub_configs_describe_map_and_build_megatron_configs(tmp_path, name):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from megatron_vcap.convert.mapping import build_rules, normalize_hf_name
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.megatron_config import build_megatron_configs

    (tmp_path / "config.json").write_text(json.dumps(hub_config(name)))
    config = load_hf_config(tmp_path)
    spec = describe_hf_config(config)
    hidden, ffn, layers, heads, kv, vocab, tied = _LM[name]
    assert (spec.hidden_size, spec.ffn_hidden_size, spec.num_layers) == (hidden, ffn, layers)
    assert (spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (heads, kv, vocab)
    assert spec.tie_word_embeddings == tied and spec.head_dim == 128
    assert spec.mrope_section == (16, 24, 24) and spec.rope_theta == 1e6
    assert spec.vision_hidden_size == 1280 and spec.vision_depth == 32

    cls = (
        Qwen2VLForConditionalGeneration
        if spec.arch == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    with torch.device("meta"):
        hf_names = {normalize_hf_name(k) for k in cls(config).state_dict()}
    if tied:
        hf_names.discard("lm_head.weight")  # tied: not written to disk
    assert {n for rule in build_rules(spec) for n in rule.hf} == hf_names

    configs = build_megatron_configs(
        spec, ModelConfig(params_dtype="bf16", transformer_impl="local")
    )
    assert configs.language.num_query_groups == kv and configs.language.kv_channels == 128
    assert configs.vision.ffn_hidden_size == (5120 if spec.arch == "qwen2_vl" else 3420)
    assert configs.merger.ffn_hidden_size == 4 * 1280 and configs.merger.hidden_size == hidden
