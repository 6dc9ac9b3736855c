"""The single-rank, no-autograd fast paths of the local layers (``models/specs``:
``DirectTransformerLayer``, ``DirectColumnParallelLinear``, ``DirectRowParallelLinear``) and of the
language model (``models/direct_gpt.DirectGPTModel``) against Megatron's own forwards, bit for
bit: the VLM's full forward (vision tower, merger, decoder), the mRoPE table and KV-cached
decoding with log-probs."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vcap.models.direct_gpt import DirectGPTModel
from megatron_vcap.models.presets import (
    build_tiny_inputs,
    build_tiny_processor,
    synthetic_frames,
    tiny_hf_config,
)
from megatron_vcap.models.specs import (
    DirectColumnParallelLinear,
    DirectRowParallelLinear,
    DirectTransformerLayer,
    RotaryCachedSelfAttention,
)

VID = "<|vision_start|><|video_pad|><|vision_end|>"
DIRECT = (DirectTransformerLayer, DirectColumnParallelLinear, DirectRowParallelLinear)


def _direct_modules(model):
    return [m for m in model.modules() if isinstance(m, DIRECT)]


def _perturb(model) -> None:
    """Random values everywhere: Megatron initialises biases to zero, which would hide a
    forgotten bias add."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _megatron_paths_forbidden(direct=DIRECT):
    """Patches that fail if Megatron's own forward runs for a module of a ``direct`` class (the
    output layer is Megatron's plain ``ColumnParallelLinear`` and keeps running)."""

    def forbid(cls):
        original = cls.forward

        def forward(self, *args, **kwargs):
            if isinstance(self, direct):
                raise AssertionError(f"{cls.__name__}.forward ran: the direct path was not taken")
            return original(self, *args, **kwargs)

        return mock.patch.object(cls, "forward", forward)

    classes = (TransformerLayer, ColumnParallelLinear, RowParallelLinear, SelfAttention, GPTModel)
    return tuple(forbid(cls) for cls in classes)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_vlm_forward_equals_megatrons_bit_for_bit(single_rank, arch):
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.mrope import compute_mrope_position_ids
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    hf_config = tiny_hf_config(arch)
    torch.manual_seed(0)
    model = build_qwen_vl_model(
        hf_config, ModelConfig(params_dtype="fp32", transformer_impl="local")
    )
    model.eval()
    _perturb(model)
    kinds = {type(m) for m in _direct_modules(model)}
    assert kinds == set(DIRECT)  # every layer of the tower and the decoder, and their linears
    inputs = build_tiny_inputs(
        build_tiny_processor(hf_config),
        [f"clip {VID} describe", f"{VID} short"],
        videos=[synthetic_frames(4, 84, 112, 4), synthetic_frames(2, 56, 56, 5)],
        video_fps=[2.0, 1.0],
    )
    pos, _ = compute_mrope_position_ids(
        inputs["input_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
        hf_config=hf_config,
    )
    args = (inputs["input_ids"], pos, inputs["attention_mask"])
    video = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw")}
    with torch.enable_grad():  # autograd on: Megatron's forwards run
        reference = model(*args, **video).detach()
    patches = _megatron_paths_forbidden()
    with torch.no_grad(), patches[0], patches[1], patches[2], patches[3]:
        direct = model(*args, **video)  # no inference context: GPTModel's own forward runs
    assert torch.equal(direct, reference)


def test_kv_cached_decoding_equals_megatrons_bit_for_bit(single_rank):
    """Prefill, decode steps with a left-padding mask, compaction: same tokens and log-probs
    with the direct paths switched off (attention's too: its static-context forward)."""
    from megatron_vcap.rollout.generate import generate
    from megatron_vcap.rollout.sampling import SamplingParams
    from megatron_vcap.rollout.types import PromptSpec
    from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

    torch.manual_seed(5)
    model = build_tiny_mrope_gpt(TinyGPTConfig(vocab_size=64, core_attention="sdpa"))
    _perturb(model)
    g = torch.Generator().manual_seed(1)
    prompts = [PromptSpec.from_text_ids(torch.randint(0, 64, (n,), generator=g)) for n in (9, 4)]
    params = SamplingParams(temperature=0.8, max_new_tokens=12, eos_token_ids=[3, 7, 11])
    kw = dict(sampling=params, group_size=3, seed=2, return_logprobs=True)
    patches = _megatron_paths_forbidden((*DIRECT, RotaryCachedSelfAttention, DirectGPTModel))
    with patches[0], patches[1], patches[2], patches[3], patches[4]:
        fast = generate(model, prompts, **kw)
    modules = [m for m in model.modules() if hasattr(m, "_direct")]
    assert modules
    for m in modules:
        m._direct = False
    try:
        slow = generate(model, prompts, **kw)
    finally:
        for m in modules:
            m._direct = True
    assert len({o.num_tokens for o in fast}) > 1  # rows ended at different steps
    for a, b in zip(fast, slow):
        assert a.response_ids_R.tolist() == b.response_ids_R.tolist()
        assert torch.equal(a.logprobs_R, b.logprobs_R)


@pytest.mark.parametrize("section", [[2, 1, 1], [4, 6, 6]])
def test_mrope_table_equals_megatrons_bit_for_bit(single_rank, section):
    """``DirectGPTModel.mrope_embedding`` against Megatron's ``MultimodalRotaryEmbedding`` on
    positions whose three axes differ (video tokens), up to 10^5."""
    from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

    head_dim = 2 * sum(section)
    model = build_tiny_mrope_gpt(
        TinyGPTConfig(hidden_size=2 * head_dim, num_attention_heads=2, mrope_section=section)
    )
    assert isinstance(model, DirectGPTModel) and model._direct
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 100_000, (3, 5, 7), generator=g)
    positions[:, 0] = torch.arange(7)  # a text row: the three axes equal
    reference = model.rotary_pos_emb(positions, model.mrope_section)
    fast = model.mrope_embedding(positions)
    assert fast.shape == reference.shape
    assert torch.equal(fast, reference)
