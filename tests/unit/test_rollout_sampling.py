"""Top-k / top-p filtering and sampling against plain per-row references; stop criteria."""

from __future__ import annotations

import pytest
import torch

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rollout.config import RolloutConfig
from megatron_vcap.rollout.sampling import SamplingParams, filter_logits, sample_tokens
from megatron_vcap.rollout.stopping import StopChecker


def _reference_keep(row, top_k, top_p):
    """Indices kept: the k largest, then the shortest most-likely prefix reaching top_p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k:
        kth = row[order[top_k - 1]]
        order = [i for i in order if row[i] >= kth]
    exps = [torch.tensor(row[i]).exp().item() for i in order]
    total = sum(exps)
    kept, acc = [], 0.0
    for i, e in zip(order, exps):
        kept.append(i)
        acc += e / total
        if acc >= top_p:
            break
    return sorted(kept)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (3, 1.0), (4, 0.8), (0, 1.0), (1, 0.3)])
def test_filter_matches_reference(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64) * 2
    out = filter_logits(logits, top_k=top_k, top_p=top_p)
    for b in range(6):
        kept = torch.isfinite(out[b]).nonzero().flatten().tolist()
        assert kept == _reference_keep(logits[b].tolist(), top_k, top_p), (b, top_k, top_p)
        assert torch.equal(out[b][kept], logits[b][kept])


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
    tokens = sample_tokens(logits, params, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double() / tokens.numel()
    expected = torch.softmax(filter_logits(logits[:1] / 0.8, top_k=4, top_p=0.95), -1)[0]
    assert counts[4:].sum() == 0  # outside the top-4: never drawn
    torch.testing.assert_close(counts, expected.double(), atol=0.01, rtol=0)
    greedy = sample_tokens(logits[:3], SamplingParams(temperature=0.0))
    assert greedy.tolist() == [0, 0, 0]


def test_params_validation_and_from_config():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[[]])
    cfg = RolloutConfig(temperature=0.7, top_k=5, max_new_tokens=33)
    params = SamplingParams.from_config(cfg, eos_token_ids=[2, 3], top_p=0.5)
    assert (params.temperature, params.top_k, params.top_p) == (0.7, 5, 0.5)
    assert params.max_new_tokens == 33 and params.eos_token_ids == [2, 3]
    assert params.stop_strings == ["</answer>"]


def test_stop_string_split_over_tokens_with_multibyte_text():
    # Token i decodes to VOCAB[i]; the stop string arrives in pieces after multi-byte text.
    vocab = ["é漢", "</", "ans", "wer", ">", "x", "</answer"]

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    checker = StopChecker(SamplingParams(max_new_tokens=50, stop_strings=["</answer>"]), decode)
    seq = [0] * 30 + [1, 2, 3]
    for n in range(1, len(seq) + 1):
        assert checker.check(seq[:n]) is None
    assert checker.check(seq + [4]) == "stop"
    assert checker.check([0, 6, 4]) == "stop"
    length = StopChecker(SamplingParams(max_new_tokens=3, eos_token_ids=[5]))
    assert length.check([0, 0]) is None and length.check([0, 0, 0]) == "length"
    assert length.check([0, 5]) == "eos"
    assert length.check([0, 0, 5]) == "eos"  # EOS wins over length at the last slot


def test_suppressed_tokens_are_never_chosen():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(500, 1)
    greedy = SamplingParams(temperature=0.0, suppress_token_ids=[0])
    assert sample_tokens(logits, greedy).unique().tolist() == [1]
    sampled = SamplingParams(temperature=2.0, suppress_token_ids=[0, 1])
    drawn = sample_tokens(logits, sampled, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {2, 3}
    assert logits[0, 0] == 5.0  # the caller's logits are left alone
