"""TrainBatch assembly and micro-batch slicing against row-by-row construction."""

from __future__ import annotations

import pytest
import torch

from megatron_vcap.rl.losses import compute_sequence_logprobs
from megatron_vcap.rl.records import Rollout, build_train_batch
from megatron_vcap.rollout.types import PromptSpec


def _prompts():
    pos = torch.tensor([[0, 1, 2, 2, 2, 4], [0, 1, 2, 2, 3, 4], [0, 1, 2, 3, 2, 4]])
    video = PromptSpec(torch.tensor([5, 6, 7, 7, 7, 8]), pos, rope_delta=-1,
                       vision_kwargs={"pixel_values_videos": torch.ones(2, 3)})  # fmt: skip
    text = PromptSpec.from_text_ids([9, 10, 11])
    return [video, text]


def _rollouts(prompts):
    responses = {(0, 0): [1, 2, 3], (0, 1): [4], (1, 0): [5, 6, 7, 8, 9], (1, 1): [2, 2]}
    out = []
    for (g, s), resp in responses.items():
        out.append(Rollout(f"p{g}s{s}", g, s, prompts[g].input_ids_S, torch.tensor(resp), "eos"))
    out[1].valid = False
    return out


def test_rows_match_plain_concatenation():
    prompts = _prompts()
    rollouts = _rollouts(prompts)
    batch = build_train_batch(rollouts, prompts, torch.arange(4.0), pad_to_multiple_of=4)
    assert batch.tokens_BT.shape == (4, 12)  # longest row 9, padded to a multiple of 4
    for b, r in enumerate(rollouts):
        p = prompts[r.group_index]
        S, R = p.length, r.response_ids_R.numel()
        assert (
            batch.tokens_BT[b, : S + R].tolist()
            == p.input_ids_S.tolist() + r.response_ids_R.tolist()
        )
        # Response positions continue as s + rope_delta on all three axes.
        for axis in range(3):
            expected = p.position_ids_3S[axis].tolist() + [S + i + p.rope_delta for i in range(R)]
            assert batch.position_ids_3BT[axis, b, : S + R].tolist() == expected
        expected_mask = [0.0] * S + [float(r.valid)] * R + [0.0] * (12 - S - R)
        assert batch.loss_mask_BT[b].tolist() == expected_mask
        assert batch.vision_for_rows()[b] is p.vision_kwargs
    assert batch.seq_len_B.tolist() == [9, 7, 8, 5]


def test_micro_batches_reassemble_the_batch_and_carry_only_their_prompts():
    prompts = _prompts()
    batch = build_train_batch(_rollouts(prompts), prompts, torch.arange(4.0))
    batch.ref_logp_BT = torch.randn(batch.tokens_BT.shape)
    micro = batch.micro_batches(2)
    assert [m.num_samples for m in micro] == [2, 2]
    # The second micro-batch holds only the text prompt: vision re-indexed, trimmed to width 8.
    assert micro[1].vision == [{}] and micro[1].prompt_index_B.tolist() == [0, 0]
    assert micro[1].tokens_BT.shape == (2, 8)
    for m, rows in zip(micro, (slice(0, 2), slice(2, 4))):
        width = m.tokens_BT.size(1)
        assert torch.equal(m.tokens_BT, batch.tokens_BT[rows, :width])
        assert torch.equal(m.position_ids_3BT, batch.position_ids_3BT[:, rows, :width])
        assert torch.equal(m.ref_logp_BT, batch.ref_logp_BT[rows, :width])
        assert torch.equal(m.adv_B, batch.adv_B[rows])
        # trimming never drops a trained token
        assert m.loss_mask_BT.sum() == batch.loss_mask_BT[rows].sum()
    with pytest.raises(ValueError, match="prompt ids"):
        bad = _rollouts(prompts)
        bad[0].group_index = 1
        build_train_batch(bad, prompts, torch.zeros(4))


def test_sequence_logprobs_are_aligned_with_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    logp, ent = compute_sequence_logprobs(logits, tokens)
    assert logp.shape == tokens.shape and (logp[:, 0] == 0).all() and (ent[:, 0] == 0).all()
    for b in range(2):
        for t in range(1, 5):
            expected = torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]]
            assert abs(float(logp[b, t] - expected)) < 1e-6
