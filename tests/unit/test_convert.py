"""HF <-> Megatron conversion: the mapping table, round trips, checkpoint functions, CLI errors.

The round trips run the real conversion code in this process at TP=1 (the multi-rank layouts
are covered by tests/distributed/test_model_parallel.py) and compare safetensors byte for byte;
the converted-back directory must load in ``transformers`` and give the original logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.models.presets import (
    build_tiny_hf_model,
    save_tiny_hf_model_dir,
    tiny_hf_config,
)


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


# ---- the mapping table, on its own ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_every_hf_tensor_has_exactly_one_rule_and_round_trips(arch):
    from megatron_vcap.convert import mapping
    from megatron_vcap.models.hf_config import describe_hf_config

    config = tiny_hf_config(arch)
    spec = describe_hf_config(config)
    hf_state = {
        mapping.normalize_hf_name(k): v for k, v in build_tiny_hf_model(config).state_dict().items()
    }
    rules = mapping.build_rules(spec)
    covered = [name for rule in rules for name in rule.hf]
    assert sorted(covered) == sorted(hf_state)
    for rule in rules:
        parts = [hf_state[n] for n in rule.hf]
        back = mapping.mcore_to_hf(rule, mapping.hf_to_mcore(rule, parts, spec), spec)
        assert all(torch.equal(a, b) for a, b in zip(parts, back)), rule.mcore


def test_glu_shards_take_their_slice_of_gate_and_of_up():
    from megatron_vcap.convert.mapping import Rule, shard_for_rank

    gate, up = torch.arange(8.0).view(4, 2), 100 + torch.arange(8.0).view(4, 2)
    full = torch.cat([gate, up])
    rule = Rule("x.linear_fc1.weight", ("g", "u"), "glu")
    shard = shard_for_rank(rule, full, torch.Size([4, 2]), 1, 2)
    assert torch.equal(shard, torch.cat([gate[2:], up[2:]]))
    with pytest.raises(ValueError, match="cannot shard"):
        shard_for_rank(rule, full, torch.Size([3, 2]), 0, 2)


def test_reader_accepts_transformers5_in_memory_names(tmp_path):
    from safetensors.torch import save_file

    from megatron_vcap.convert.hf_io import HFWeightReader

    t = torch.ones(2)
    save_file(
        {"model.language_model.norm.weight": t, "model.visual.merger.ln_q.weight": t.clone()},
        str(tmp_path / "model.safetensors"),
    )
    assert sorted(HFWeightReader(tmp_path).names()) == [
        "model.norm.weight",
        "visual.merger.ln_q.weight",
    ]


# ---- round trips through the real conversion code ---------------------------------------------


@pytest.mark.parametrize(
    "arch, dtype, overrides",
    [
        ("qwen2_5_vl", torch.float32, {}),
        ("qwen2_5_vl", torch.bfloat16, {}),
        ("qwen2_vl", torch.float32, {"tie_word_embeddings": True}),
    ],
)
@pytest.mark.usefixtures("single_rank")
def test_hf_to_mcore_to_hf_is_bit_identical(tmp_path, arch, dtype, overrides):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megatron_vcap.convert.hf_to_mcore import convert_on_this_rank
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    src = save_tiny_hf_model_dir(tmp_path / "hf", arch, dtype=dtype, seed=5, **overrides)
    convert_on_this_rank(str(src), str(tmp_path / "ckpt"), 1, 1, progress=False)
    assert (tmp_path / "ckpt" / "hf" / "tokenizer.json").is_file()
    # A small shard limit forces several shards and an index.
    out = convert_mcore_to_hf(
        tmp_path / "ckpt", tmp_path / "back", max_shard_bytes=200_000, progress=False
    )
    assert (out / "model.safetensors.index.json").is_file()
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after)
    assert all(_bitwise_equal(before[k], after[k]) for k in before)
    assert json.loads((src / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text()
    )
    # transformers loads the result directly, with the original's outputs.
    original = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype).eval()
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=dtype).eval()
    AutoProcessor.from_pretrained(out)
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.usefixtures("single_rank")
def test_checkpoint_load_ignores_other_keys_and_returns_common_state(tmp_path):
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_vcap.convert.checkpoint import (
        load_hf_weights,
        load_model_checkpoint,
        save_model_checkpoint,
    )
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    src = save_tiny_hf_model_dir(tmp_path / "hf", "qwen2_5_vl")
    config = tiny_hf_config("qwen2_5_vl")
    cfg = ModelConfig(params_dtype="fp32", transformer_impl="local")
    model = build_qwen_vl_model(config, cfg)
    load_hf_weights(model, src)
    moments = torch.arange(6.0)
    extra = {"optimizer": {"m": ShardedTensor.from_rank_offsets("optimizer.m", moments)}}
    save_model_checkpoint(tmp_path / "ckpt", model, src, extra, {"iteration": 7})
    assert not (tmp_path / "ckpt.tmp").exists()

    fresh = build_qwen_vl_model(config, cfg)
    state = load_model_checkpoint(tmp_path / "ckpt", fresh)  # model only; optimizer stays on disk
    assert state["iteration"] == 7 and "optimizer" not in state
    before, after = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    request = {"optimizer": {"m": ShardedTensor.from_rank_offsets("optimizer.m", moments * 0)}}
    state = load_model_checkpoint(tmp_path / "ckpt", fresh, request)
    assert torch.equal(state["optimizer"]["m"], moments)


# ---- errors name the file and the field ---------------------------------------------------------


def _write_config(tmp_path, mutate) -> str:
    raw = tiny_hf_config("qwen2_5_vl").to_dict()
    mutate(raw)
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(raw))
    return str(d)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["vision_config"].pop("depth"), "vision_config.depth"),
        (lambda c: c["text_config"].pop("hidden_size"), "text_config.hidden_size"),
        (lambda c: c["text_config"]["rope_parameters"].pop("mrope_section"), "mrope_section"),
        (lambda c: c.update(model_type="llava"), "model_type 'llava' is not supported"),
        (lambda c: c["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
        (
            lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
            "mrope_section",
        ),
    ],
)
def test_bad_config_errors_name_the_field(tmp_path, capsys, mutate, field):
    bad = _write_config(tmp_path, mutate)
    code = vcap_main(["convert", "hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert field in err and "config.json" in err, err


def test_cli_errors_for_missing_inputs(tmp_path, capsys):
    assert (
        vcap_main(
            ["convert", "hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert (
        vcap_main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not a Megatron distributed checkpoint" in capsys.readouterr().err
    assert (
        vcap_main(
            [
                "convert",
                "mcore-to-hf",
                "--ckpt",
                str(tmp_path),
                "--out",
                "o",
                "--max-shard-size",
                "lots",
            ]
        )
        == 2
    )
    assert "--max-shard-size" in capsys.readouterr().err


def test_cli_rejects_a_layout_the_model_cannot_split(tmp_path, capsys):
    src = save_tiny_hf_model_dir(tmp_path / "hf", "qwen2_5_vl")
    out = str(tmp_path / "o")
    assert vcap_main(["convert", "hf-to-mcore", "--hf", str(src), "--out", out, "--tp", "3"]) == 2
    assert "num_key_value_heads' (2) is not divisible by the tensor-parallel size 3" in (
        capsys.readouterr().err
    )
    assert vcap_main(["convert", "hf-to-mcore", "--hf", str(src), "--out", out, "--pp", "3"]) == 2
    assert "num_hidden_layers' (2) is not divisible" in capsys.readouterr().err


def test_parse_size():
    from megatron_vcap.convert.cli import parse_size

    assert parse_size("5GB") == 5 * 2**30
    assert parse_size("500 MB") == 500 * 2**20
    assert parse_size("1024") == 1024
