"""Sequence packing for the training passes: a micro-batch's rows as one THD sequence.

A padded micro-batch computes B x T tokens, T being its longest row; with G responses of very
different lengths after one long video prompt most of that is padding. Packing concatenates the
real tokens of the rows into one sequence of N = sum(seq_len_B) tokens and hands the model
Megatron's ``PackedSeqParams`` (``qkv_format="thd"``, ``cu_seqlens``) so attention stays inside
each row: Transformer Engine's attention takes THD directly on GPU; on CPU the local SDPA core
(``models/specs.py``) attends causally within each segment (a block-diagonal causal mask).

mRoPE positions are each row's own (t, h, w) ids, computed per sequence from its prompt before
packing and concatenated as they are; recomputing them over the packed row would number the
second row's video after the first row's tokens. Megatron applies a position table of exactly N
rows to THD tokens one to one (``rope_utils._apply_rotary_pos_emb_thd``, "exact mapping").

Log-probs computed over the packed sequence are scattered back to the padded [B, T] layout
(:func:`unpack_BT`), so losses, masks and stored log-probs keep one layout; the prediction that
crosses from one row into the next lands on a row's column 0, which is 0 by convention.

Shape legend: B rows, T padded width, N packed tokens (with any tail padding), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class PackedRows:
    """One micro-batch packed into a single sequence (batch dimension 1)."""

    tokens_1N: torch.Tensor
    position_ids_31N: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [segments + 1]; a tail pad segment when padded
    row_N: torch.Tensor  # packed token -> its row (the tail pad points at row 0, column 0)
    col_N: torch.Tensor  # packed token -> its column in the padded layout
    real_N: torch.Tensor  # bool: a token of a row (not tail padding)
    max_seqlen: int
    shape_BT: tuple[int, int]

    @property
    def params(self) -> PackedSeqParams:
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def to(self, device) -> PackedRows:
        moved = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()
        }
        return PackedRows(**moved)


def pack_rows(
    tokens_BT: torch.Tensor,
    position_ids_3BT: torch.Tensor,
    seq_len_B: torch.Tensor,
    *,
    multiple: int = 1,
    pad_token_id: int = 0,
) -> PackedRows:
    """Pack right-padded rows (real tokens ``[:seq_len_B[b]]``) into one THD sequence.

    ``multiple`` pads N up to a multiple (FP8 GEMMs need 16, sequence parallelism the TP size)
    with one extra segment of pad tokens, which attends only to itself and is never read back.
    """
    B, T = tokens_BT.shape
    lengths = [int(n) for n in seq_len_B.tolist()]
    if any(n < 1 or n > T for n in lengths):
        raise ValueError(f"seq_len_B: lengths must be in [1, {T}], got {lengths}")
    device = tokens_BT.device
    real_BT = torch.arange(T, device=device)[None, :] < seq_len_B.to(device)[:, None]
    row_N, col_N = real_BT.nonzero(as_tuple=True)  # row-major: row 0's tokens, then row 1's
    tokens_N = tokens_BT[row_N, col_N]
    positions_3N = position_ids_3BT[:, row_N, col_N]
    n = tokens_N.numel()
    total = -(-n // multiple) * multiple
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    if total > n:
        pad = total - n
        bounds.append(total)
        tokens_N = torch.cat([tokens_N, tokens_N.new_full((pad,), pad_token_id)])
        positions_3N = torch.cat(
            [positions_3N, torch.arange(pad, device=device).expand(3, -1)], dim=1
        )
        zeros = row_N.new_zeros(pad)
        row_N, col_N = torch.cat([row_N, zeros]), torch.cat([col_N, zeros])
    real_N = torch.arange(total, device=device) < n
    return PackedRows(
        tokens_1N=tokens_N[None],
        position_ids_31N=positions_3N[:, None],
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
        row_N=row_N,
        col_N=col_N,
        real_N=real_N,
        max_seqlen=max(b - a for a, b in zip(bounds[:-1], bounds[1:])),
        shape_BT=(B, T),
    )


def unpack_BT(values_1N: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """Per-token values of the packed sequence -> [B, T] (0 on padding and on column 0).

    Differentiable: gradients flow back to the packed positions that were read.
    """
    keep_N = packed.real_N & (packed.col_N > 0)
    out_BT = values_1N.new_zeros(packed.shape_BT)
    return out_BT.index_put((packed.row_N[keep_N], packed.col_N[keep_N]), values_1N[0][keep_N])


def computed_tokens(seq_len_B: torch.Tensor, width: int, *, packed: bool) -> int:
    """Tokens the model computes for one micro-batch: N packed, B x T padded."""
    return int(seq_len_B.sum()) if packed else int(seq_len_B.numel()) * width
