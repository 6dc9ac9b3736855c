"""Training batches keep row lengths a multiple of 16 when FP8 needs it (and only then)."""

import torch

from megatron_vcap.models.config import ModelConfig
from megatron_vcap.rl.policy import sequence_multiple
from megatron_vcap.rl.sft import build_sft_batch


def _examples(lengths):
    out = []
    for n in lengths:
        ids = torch.arange(n)
        labels = torch.full((n,), -100)
        labels[n // 2 :] = ids[n // 2 :]
        pos = torch.arange(n).expand(3, -1)
        out.append((ids, labels, pos, {}))
    return out


def test_fp8_pads_rows_and_micro_batches_to_16():
    assert sequence_multiple(ModelConfig()) == 1
    assert sequence_multiple(ModelConfig(fp8="hybrid", transformer_impl="auto")) == 16
    batch = build_sft_batch(_examples([5, 21, 9, 3]), pad_token_id=0, pad_to_multiple_of=16)
    assert batch.tokens_BT.shape == (4, 32)
    assert int(batch.loss_mask_BT.sum()) == sum(n - n // 2 for n in (5, 21, 9, 3))
    widths = [mb.tokens_BT.shape[1] for mb in batch.micro_batches(2, multiple=16)]
    assert widths == [32, 16]  # rows (5, 21) and (9, 3), each trimmed to a multiple of 16
    plain = build_sft_batch(_examples([5, 21, 9, 3]), pad_token_id=0)
    assert [mb.tokens_BT.shape[1] for mb in plain.micro_batches(2)] == [21, 9]
