"""FLOP and byte counts for the GPU kit's benchmarks, and the GPUs' datasheet ceilings.

* :func:`lm_train_flops` is Megatron-LM's model-FLOPs formula for a GPT decoder (Narayanan et
  al. 2021, appendix; Megatron's ``num_floating_point_operations``): 12 = 3 (forward, weight
  gradient, data gradient) x 2 (two GEMMs of each shape per block) x 2 (multiply-add), times
  ``s L h^2`` x [attention ``(1 + g/n + s/h) * (n d / h)`` + MLP ``(f/h) * 3/2`` (SwiGLU: three
  GEMMs of h x f instead of two) + logits ``V / (2 L h)``]. Like Megatron it counts the whole
  s x s score matrix (no causal halving), so the figure compares with Megatron's own MFU.
* :func:`vision_train_flops` adds the vision tower the same way, per segment (window or frame)
  actually attended: patch embedding, per block QKV / proj / MLP GEMMs and ``4 L_seg^2 d``
  attention per segment, and the 2x2 patch merger; x3 for training.
* :func:`decode_bytes_per_step` is what one KV-cached decode step must read from HBM at least:
  every LM weight but the input embedding table (only B rows of it are read) plus the K and V of
  every cached position of every row.

All functions are pure and take plain numbers (``QwenVLSpec`` fields), so the tests check them
against sums written out by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Dense (no sparsity) bf16 tensor-core peak and HBM bandwidth, NVIDIA datasheets. Matched by
# substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
DATASHEET = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.039e12),
)


@dataclass(frozen=True)
class Ceiling:
    name: str
    bf16_flops: float | None  # FLOP/s
    hbm_bytes_per_s: float | None


def datasheet_ceiling(device_name: str) -> Ceiling:
    for key, flops, bandwidth in DATASHEET:
        if key.lower() in device_name.lower():
            return Ceiling(key, flops, bandwidth)
    return Ceiling(device_name, None, None)


def lm_train_flops(
    seq_lens: Sequence[int],
    *,
    num_layers: int,
    hidden: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    ffn_hidden: int,
    vocab: int,
    gated: bool = True,
) -> float:
    """Megatron's training FLOPs (forward + backward) for sequences of the given lengths."""
    q_ratio = head_dim * num_heads / hidden
    gate = 1.5 if gated else 1.0
    total = 0.0
    for s in seq_lens:
        attention = (1 + num_kv_heads / num_heads + s / hidden) * q_ratio
        mlp = ffn_hidden / hidden * gate
        logits = vocab / (2 * num_layers * hidden)
        total += 12 * s * num_layers * hidden * hidden * (attention + mlp + logits)
    return total


def vision_segments(
    grid_thw: Sequence[Sequence[int]], *, merge: int, window_units: int | None
) -> tuple[list[int], list[int]]:
    """Patch counts of the attention segments: (per frame, per window) over all items.

    Frames are one temporal patch of an item (h x w patches); windows tile each frame in
    ``window_units`` x ``window_units`` merged units (edge windows smaller), as Qwen2.5-VL does.
    Without windows (Qwen2-VL) the window list equals the frame list.
    """
    frames, windows = [], []
    for t, h, w in grid_thw:
        frames += [h * w] * t
        if window_units is None:
            windows += [h * w] * t
            continue
        gh, gw = h // merge, w // merge
        rows = [min(window_units, gh - r) for r in range(0, gh, window_units)]
        cols = [min(window_units, gw - c) for c in range(0, gw, window_units)]
        windows += [r * c * merge * merge for r in rows for c in cols] * t
    return frames, windows


def vision_train_flops(
    grid_thw: Sequence[Sequence[int]],
    *,
    depth: int,
    hidden: int,
    ffn_hidden: int,
    gated: bool,
    patch_dim: int,
    merge: int,
    out_hidden: int,
    window_units: int | None = None,
    full_blocks: Sequence[int] = (),
    train: bool = True,
) -> float:
    """Vision tower FLOPs for the items ``grid_thw`` ([t, h, w] patches each).

    ``patch_dim`` = channels x temporal patch x patch^2 (the patch embedding's input width);
    ``full_blocks`` attend per frame, the other blocks per window (all per frame when
    ``window_units`` is None). ``train`` multiplies by 3 (forward + both backward GEMMs).
    """
    frames, windows = vision_segments(grid_thw, merge=merge, window_units=window_units)
    n = sum(frames)
    linear = 2 * n * (4 * hidden * hidden + (3 if gated else 2) * hidden * ffn_hidden)
    forward = 2 * n * patch_dim * hidden  # patch embedding (a convolution with stride = kernel)
    for block in range(depth):
        segments = frames if (window_units is None or block in full_blocks) else windows
        forward += linear + sum(4 * seg * seg * hidden for seg in segments)
    merged = hidden * merge * merge
    forward += 2 * (n // (merge * merge)) * (merged * merged + merged * out_hidden)
    return forward * (3 if train else 1)


def lm_weight_bytes(
    *,
    num_layers: int,
    hidden: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    ffn_hidden: int,
    vocab: int,
    dtype_bytes: int = 2,
) -> int:
    """Bytes of the LM weights a decode step reads: every layer, final norm, output layer."""
    qkv = (
        hidden * (num_heads + 2 * num_kv_heads) * head_dim
        + (num_heads + 2 * num_kv_heads) * head_dim
    )
    proj = num_heads * head_dim * hidden
    mlp = 3 * hidden * ffn_hidden
    norms = 2 * hidden
    per_layer = qkv + proj + mlp + norms
    return (num_layers * per_layer + hidden + vocab * hidden) * dtype_bytes


def kv_bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2):
    """K and V of one cached position over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def decode_bytes_per_step(
    context_lens: Sequence[int],
    *,
    num_layers: int,
    hidden: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    ffn_hidden: int,
    vocab: int,
    dtype_bytes: int = 2,
) -> int:
    """HBM bytes one decode step reads at least: LM weights + the KV of each row's context."""
    weights = lm_weight_bytes(
        num_layers=num_layers,
        hidden=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffn_hidden=ffn_hidden,
        vocab=vocab,
        dtype_bytes=dtype_bytes,
    )
    per_token = kv_bytes_per_token(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes
    )
    return weights + per_token * sum(context_lens)


def lm_shape(spec) -> dict:
    """The LM numbers of a ``QwenVLSpec`` as keyword arguments for the functions above."""
    return dict(
        num_layers=spec.num_layers,
        hidden=spec.hidden_size,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        ffn_hidden=spec.ffn_hidden_size,
        vocab=spec.vocab_size,
    )


def vision_shape(spec) -> dict:
    """The vision numbers of a ``QwenVLSpec`` for :func:`vision_train_flops`."""
    window_units = None
    if spec.window_size:
        window_units = spec.window_size // spec.patch_size // spec.spatial_merge_size
    return dict(
        depth=spec.vision_depth,
        hidden=spec.vision_hidden_size,
        ffn_hidden=spec.vision_ffn_hidden_size,
        gated=spec.arch == "qwen2_5_vl",
        patch_dim=spec.in_channels * spec.temporal_patch_size * spec.patch_size**2,
        merge=spec.spatial_merge_size,
        out_hidden=spec.hidden_size,
        window_units=window_units,
        full_blocks=tuple(spec.fullatt_block_indexes),
    )
