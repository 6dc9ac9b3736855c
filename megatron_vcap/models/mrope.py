"""3D mRoPE position ids (temporal, height, width) for Qwen2-VL / Qwen2.5-VL inputs.

Text tokens advance all three axes together by one per token. The pad tokens of an image or a
video (a run of ``<|image_pad|>`` / ``<|video_pad|>``) take the (t, h, w) coordinates of their
merged patches, offset by the position where the run starts; the text after the run continues
from that start plus ``max(h, w) / merge``. For Qwen2.5-VL videos the temporal coordinate of
temporal patch i is ``int(i * tokens_per_second * second_per_grid_ts)`` (absolute time: 2 / fps
seconds per temporal patch when two frames form one); images and Qwen2-VL videos use ``i``.

This reproduces ``get_rope_index`` of the installed ``transformers`` (5.x) exactly, including its
float32 arithmetic for the temporal coordinate. Padding (left or right) is skipped; pad positions
get 0.
"""

from __future__ import annotations

import torch

from megatron_vcap.models.hf_config import describe_hf_config

TEXT, IMAGE, VIDEO = 0, 1, 2


def _runs(types: list[int]) -> list[tuple[int, int, int]]:
    """[(type, start, end)] for each run of equal consecutive values."""
    runs, start = [], 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            runs.append((types[start], start, i))
            start = i
    return runs


def _vision_positions(grid, start: int, merge: int, time_interval) -> torch.Tensor:
    t, h, w = (int(x) for x in grid)
    h, w = h // merge, w // merge
    t_pos = (torch.arange(t) * time_interval).long() + start
    shape = (t, h, w)
    return torch.stack(
        [
            t_pos.view(t, 1, 1).expand(shape),
            (torch.arange(h) + start).view(1, h, 1).expand(shape),
            (torch.arange(w) + start).view(1, 1, w).expand(shape),
        ]
    ).reshape(3, -1)


def compute_mrope_position_ids(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    hf_config,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, S] -> (position_ids [3, B, S], rope_deltas [B]).

    Images and videos are consumed in order across the batch, as the HF processor lays them out.
    ``rope_deltas[b]`` is such that the token at absolute index s >= S of row b (decoding)
    takes position ``s + rope_deltas[b]`` on all three axes. (HF's own ``rope_deltas`` counts real
    tokens only, so it exceeds this one by the row's number of pad tokens.)
    Raises ValueError when a run of pad tokens does not match its grid's size, or the grids run out.
    """
    spec = describe_hf_config(hf_config)
    merge = spec.spatial_merge_size
    batch, seq = input_ids.shape
    grids = {
        IMAGE: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        VIDEO: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    # Float32 like the processor's tensor: the temporal coordinate truncates a float product.
    seconds = iter(
        torch.as_tensor(second_per_grid_ts, dtype=torch.float32).cpu()
        if second_per_grid_ts is not None
        else []
    )
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    mask = attention_mask.cpu().bool() if attention_mask is not None else None
    for b in range(batch):
        ids = ids_cpu[b] if mask is None else ids_cpu[b][mask[b]]
        types = torch.zeros_like(ids)
        types[ids == spec.image_token_id] = IMAGE
        types[ids == spec.video_token_id] = VIDEO
        pieces, cur = [], 0
        for kind, start, end in _runs(types.tolist()):
            if kind == TEXT:
                pieces.append(torch.arange(cur, cur + end - start).expand(3, -1))
                cur += end - start
                continue
            name = "image" if kind == IMAGE else "video"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(
                    f"row {b}: a run of {end - start} {name} pad tokens at position {start} "
                    f"has no {name}_grid_thw entry left (too few {name}s for the pad tokens)"
                )
            expected = grid[0] * grid[1] * grid[2] // merge**2
            if end - start != expected:
                raise ValueError(
                    f"row {b}: {end - start} {name} pad tokens at position {start}, but its "
                    f"{name}_grid_thw {grid} gives {expected} features"
                )
            interval = 1
            if kind == VIDEO and spec.tokens_per_second is not None:
                second = next(seconds, None)
                interval = spec.tokens_per_second * (second if second is not None else 1)
            pieces.append(_vision_positions(grid, cur, merge, interval))
            cur += max(grid[1], grid[2]) // merge
        row = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        if mask is None:
            positions[:, b] = row
        else:
            positions[:, b, mask[b]] = row
        deltas[b] = (int(row.max()) + 1 if row.numel() else 0) - seq
    leftover = [
        name
        for kind, name in ((IMAGE, "image"), (VIDEO, "video"))
        if next(grids[kind], None) is not None
    ]
    if leftover:
        raise ValueError(
            f"more {leftover[0]}_grid_thw entries than runs of {leftover[0]} pad tokens in "
            "input_ids (pad tokens and vision features disagree in number)"
        )
    return positions.to(input_ids.device), deltas.to(input_ids.device)
