"""The decode-time KV cache: Megatron's ``StaticInferenceContext`` with rows we place ourselves.

Megatron's static context keeps, per attention layer, plain key and value buffers of shape
[max_seq, max_batch, groups, head_dim]. Our layers (``models/specs.RotaryCachedSelfAttention``)
store keys after rotary embedding, so a decode step rotates only its new key and query (Megatron
itself caches keys before rotary and rotates the whole cache every step). That lets us

* prefill a prompt once in a small scratch context and copy its keys/values into the G rows of
  its group (group-prefix sharing: the video is encoded and the prompt attended once, not G
  times), at any column offset (left padding), and
* drop finished rows from the batch (compaction), so late steps only compute live samples.

Buffers are zero-initialised: a padded column is masked out of attention, but an uninitialised
NaN there would still poison the softmax-weighted sum (0 * NaN = NaN).

Shape legend: C = cache columns (capacity), B = rows, G = KV groups (this TP rank), D = head dim.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext


def _make_context(max_batch: int, capacity: int) -> StaticInferenceContext:
    return StaticInferenceContext(max_batch, capacity)


class SlotKVCache:
    """A static inference context of ``num_rows`` rows and ``capacity`` columns, filled by copy."""

    def __init__(self, num_rows: int, capacity: int):
        self.context = _make_context(num_rows, capacity)
        self.capacity = capacity
        self.num_rows = num_rows

    @property
    def allocated(self) -> bool:
        return bool(self.context.key_value_memory_dict)

    def _allocate_like(self, source: StaticInferenceContext) -> None:
        memory = {}
        for layer, (k_CBGD, v_CBGD) in source.key_value_memory_dict.items():
            memory[layer] = (
                k_CBGD.new_zeros((self.capacity, self.num_rows, *k_CBGD.shape[2:])),
                v_CBGD.new_zeros((self.capacity, self.num_rows, *v_CBGD.shape[2:])),
            )
        self.context.key_value_memory_dict = memory

    def write_prefix(
        self,
        source: StaticInferenceContext,
        source_rows: torch.Tensor,
        target_rows: torch.Tensor,
        length: int,
        start_column: int,
    ) -> None:
        """Copy columns [0, length) of ``source_rows`` of a prefilled scratch context into
        columns [start_column, start_column + length) of ``target_rows`` (same count, or one
        source row broadcast to all targets)."""
        if not self.allocated:
            self._allocate_like(source)
        if set(source.key_value_memory_dict) != set(self.context.key_value_memory_dict):
            raise RuntimeError("prefill context and decode cache hold different layers")
        cols = slice(start_column, start_column + length)
        for layer, (k_src, v_src) in source.key_value_memory_dict.items():
            k_dst, v_dst = self.context.key_value_memory_dict[layer]
            k_dst[cols, target_rows] = k_src[:length, source_rows].to(k_dst.dtype)
            v_dst[cols, target_rows] = v_src[:length, source_rows].to(v_dst.dtype)

    def keep_rows(self, keep: torch.Tensor, used_columns: int) -> None:
        """Keep only the rows indexed by ``keep`` (in that order), freeing the others. Only
        columns [0, used_columns) are copied; the rest are not written yet."""
        memory = self.context.key_value_memory_dict
        for layer, buffers in memory.items():
            kept = []
            for old_CBGD in buffers:
                new_CBGD = old_CBGD.new_zeros((old_CBGD.size(0), keep.numel(), *old_CBGD.shape[2:]))
                new_CBGD[:used_columns] = old_CBGD[:used_columns, keep]
                kept.append(new_CBGD)
            memory[layer] = tuple(kept)
        self.num_rows = int(keep.numel())
        self.context.max_batch_size = self.num_rows

    def start_decoding(self, column: int) -> None:
        """Next forward call processes one token per row at ``column``."""
        self.context.sequence_len_offset = column
        self.context.batch_size_offset = 0
        self.context.enable_decode_mode()

    def advance(self) -> None:
        self.context.sequence_len_offset += 1


def new_prefill_context(batch: int, length: int) -> StaticInferenceContext:
    """A scratch context for prefilling ``batch`` copies of one prompt of ``length`` tokens."""
    return _make_context(batch, length)
