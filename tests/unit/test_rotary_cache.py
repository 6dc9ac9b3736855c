"""The decode-time rotary of ``RotaryCachedSelfAttention`` against Megatron's own."""

from __future__ import annotations

import gc

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_vcap.models.specs import _RotaryTrig, _rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_megatrons_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    freqs = torch.randn(7, 3, 1, 32, generator=g) * 10  # [s, b, 1, d], like mRoPE's output
    for heads in (1, 4):
        t = torch.randn(7, 3, heads, 32, generator=g).to(dtype)
        expected = _apply_rotary_pos_emb_bshd(t, freqs)
        assert torch.equal(_rotate(t, _RotaryTrig()(freqs, dtype)), expected)


def test_trig_is_computed_once_per_embedding_tensor():
    trig = _RotaryTrig()
    freqs = torch.randn(1, 2, 1, 8)
    first = trig(freqs, torch.float32)
    assert (
        trig(freqs, torch.float32) is first
    )  # the same tensor (the next layer of the same forward)
    other = freqs.clone()  # the next forward's embedding: same values, another tensor
    assert trig(other, torch.float32) is not first
    assert all(torch.equal(a, b) for a, b in zip(trig(other, torch.float32), first))
    del freqs, other
    gc.collect()
    assert trig(torch.randn(1, 2, 1, 8), torch.float32) is not first
