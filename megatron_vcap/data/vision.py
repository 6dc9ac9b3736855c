"""Qwen-VL visual preprocessing: frame sampling, pixel budgets, resize, normalise, patchify.

Frame sampling follows the Qwen team's reference pipeline (qwen-vl-utils): the frame count is the
clip duration times the target fps, clamped to [min_frames, max_frames] (both rounded to the
temporal patch size) and to the clip length, then floored to the temporal patch size; frames are
spread evenly over the clip (``linspace(first, last, n).round()``) and the sampled fps is
``n / clip_frames * video_fps``. Everything after decoding matches the ``transformers``
Qwen2-VL / Qwen2.5-VL processors: ``smart_resize`` to multiples of ``patch_size * merge_size``,
antialiased bicubic resize on uint8 frames, CLIP mean/std normalisation, and the same patch order.

Work is ordered for speed without changing results: frames are resized while still uint8 and
are permuted into patch order before the float conversion, so the float tensor is written once.

Shape legend: T frames, C=3 channels, H/W pixels, P patch size, Tp temporal patch size,
N = grid_t * grid_h * grid_w patches, D = C * Tp * P * P.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megatron_vcap.data.video_io import VideoDataError, VideoMeta, read_video_frames

# OpenAI CLIP statistics, the Qwen-VL processors' defaults.
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoInputs:
    """One processed video, laid out exactly like the HF processor's outputs."""

    pixel_values_videos: torch.Tensor  # float32 [N, D]
    video_grid_thw: torch.Tensor  # int64 [1, 3]
    second_per_grid_ts: float  # temporal_patch_size / sampled_fps (Qwen2.5-VL mRoPE time)
    sampled_fps: float
    num_frames: int
    frame_indices: list[int]
    source_fps: float
    resized_hw: tuple[int, int]

    def num_tokens(self, merge_size: int = 2) -> int:
        """Language-model placeholder tokens for this video: prod(grid) / merge_size**2."""
        return int(self.video_grid_thw.prod()) // (merge_size**2)


@dataclass
class ImageInputs:
    pixel_values: torch.Tensor  # float32 [N, D]
    image_grid_thw: torch.Tensor  # int64 [1, 3]

    def num_tokens(self, merge_size: int = 2) -> int:
        return int(self.image_grid_thw.prod()) // (merge_size**2)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Target (h, w): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as the ``transformers`` Qwen2-VL processors, so grids agree exactly.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def clip_frame_range(
    total_frames: int, video_fps: float, start: float | None, end: float | None
) -> tuple[int, int]:
    """First and last frame index (inclusive) of the clip [start, end] seconds."""
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(min(max(start or 0.0, 0.0), duration) * video_fps)
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(min(max(end, 0.0), duration) * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(
            f"clip start={start}s end={end}s selects no frames of a {duration:.2f}s video"
        )
    return first, last


def compute_num_frames(
    clip_frames: int,
    video_fps: float,
    *,
    fps: float,
    min_frames: int,
    max_frames: int,
    temporal_patch_size: int = 2,
) -> int:
    """Frames to sample from a clip: duration * fps, clamped, a multiple of the temporal patch."""
    f = temporal_patch_size
    lo = math.ceil(min_frames / f) * f
    hi = math.floor(max_frames / f) * f
    n = clip_frames / video_fps * fps
    n = min(max(n, lo), hi, clip_frames)
    n = math.floor(n / f) * f
    if n < f:
        raise ValueError(f"the clip has {clip_frames} frame(s); at least {f} are needed")
    return n


def sample_frame_indices(first: int, last: int, num_frames: int) -> list[int]:
    # torch.linspace in float32 + round-half-even, exactly as the reference pipeline computes it.
    return torch.linspace(first, last, num_frames).round().long().tolist()


def resize_frames(frames_THWC: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, height, width], antialiased bicubic (HF's kernel)."""
    x = torch.as_tensor(frames_THWC).permute(0, 3, 1, 2)
    if x.shape[-2:] == (height, width):
        return x.contiguous()
    # uint8 bicubic+antialias runs natively on CPU; the transformers processors call the same op.
    return F.interpolate(
        x.contiguous(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )


def _mean_std(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers folds the 1/255 rescale into mean and std (x - 255*mean) / (255*std) in fp32.
    m = torch.tensor(mean, dtype=torch.float32) * (1.0 / (1 / 255))
    s = torch.tensor(std, dtype=torch.float32) * (1.0 / (1 / 255))
    return m, s


def patchify(
    frames_TCHW: torch.Tensor,
    *,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    image_mean=QWEN_IMAGE_MEAN,
    image_std=QWEN_IMAGE_STD,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [T, C, H, W] -> normalised float32 [N, D] in Qwen-VL patch order, and (t, h, w).

    T is padded to a multiple of the temporal patch by repeating the last frame (as HF does).
    """
    x = frames_TCHW
    num_frames, channels, height, width = x.shape
    if pad := -num_frames % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        num_frames += pad
    gt, gh, gw = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = x.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    # -> [gt, gh/m, gw/m, m, m, C, Tp, P, P]: the permute is done on uint8 (4x fewer bytes).
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).contiguous()
    mean, std = _mean_std(image_mean, image_std)
    out = x.to(torch.float32)
    out.sub_(mean.view(channels, 1, 1, 1)).div_(std.view(channels, 1, 1, 1))
    return out.reshape(gt * gh * gw, channels * tp * p * p), (gt, gh, gw)


def frame_pixel_budget(
    num_frames: int,
    *,
    min_pixels: int,
    max_pixels: int,
    total_pixels: int | None,
    temporal_patch_size: int = 2,
) -> int:
    """Per-frame max pixels: ``max_pixels``, tightened by an even share of ``total_pixels``."""
    if total_pixels is None:
        return max_pixels
    share = total_pixels / num_frames * temporal_patch_size
    # Floor at 1.05 * min_pixels, as the reference pipeline does, so the cap never falls below
    # the per-frame minimum.
    return int(min(max_pixels, max(share, int(min_pixels * 1.05))))


def process_frames(
    frames_THWC: np.ndarray | torch.Tensor,
    *,
    sampled_fps: float,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean=QWEN_IMAGE_MEAN,
    image_std=QWEN_IMAGE_STD,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Already-sampled uint8 frames -> (pixel_values_videos [N, D], video_grid_thw [1, 3], hw)."""
    height, width = frames_THWC.shape[1:3]
    rh, rw = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    resized = resize_frames(frames_THWC, rh, rw)
    pixels, grid = patchify(
        resized,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
        image_mean=image_mean,
        image_std=image_std,
    )
    return pixels, torch.tensor([grid], dtype=torch.long), (rh, rw)


def process_video(
    path: str | os.PathLike,
    *,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 32,
    min_pixels: int = 128 * 28 * 28,
    max_pixels: int = 360 * 420,
    total_pixels: int | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
    num_threads: int = 0,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean=QWEN_IMAGE_MEAN,
    image_std=QWEN_IMAGE_STD,
) -> VideoInputs:
    """Decode the sampled frames of ``path`` (optionally the clip [start, end] seconds) and
    preprocess them for Qwen2-VL / Qwen2.5-VL. Raises :class:`VideoDataError` naming the file."""
    if min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    plan = {}

    def choose(meta: VideoMeta) -> list[int]:
        try:
            first, last = clip_frame_range(meta.num_frames, meta.fps, start, end)
        except ValueError as exc:
            raise VideoDataError(meta.path, "bad_range", str(exc)) from None
        clip = last - first + 1
        try:
            n = compute_num_frames(
                clip,
                meta.fps,
                fps=fps,
                min_frames=min_frames,
                max_frames=max_frames,
                temporal_patch_size=temporal_patch_size,
            )
        except ValueError as exc:
            raise VideoDataError(meta.path, "too_short", str(exc)) from None
        plan["sampled_fps"] = n / clip * meta.fps
        return sample_frame_indices(first, last, n)

    frames, meta, indices = read_video_frames(
        path, choose, backend=backend, num_threads=num_threads
    )
    budget = frame_pixel_budget(
        len(indices),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
        temporal_patch_size=temporal_patch_size,
    )
    pixels, grid, hw = process_frames(
        frames,
        sampled_fps=plan["sampled_fps"],
        min_pixels=min_pixels,
        max_pixels=budget,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
        image_mean=image_mean,
        image_std=image_std,
    )
    return VideoInputs(
        pixel_values_videos=pixels,
        video_grid_thw=grid,
        second_per_grid_ts=temporal_patch_size / plan["sampled_fps"],
        sampled_fps=plan["sampled_fps"],
        num_frames=len(indices),
        frame_indices=list(indices),
        source_fps=meta.fps,
        resized_hw=hw,
    )


def process_sample_video(sample, cfg) -> VideoInputs:
    """``process_video`` of a manifest sample's clip with a ``DataConfig``'s sampling settings
    (the one place the loader, validation and evaluation turn config into decode arguments)."""
    return process_video(
        sample.video,
        fps=cfg.fps,
        min_frames=cfg.min_frames,
        max_frames=cfg.max_frames,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        total_pixels=cfg.total_pixels,
        start=sample.start,
        end=sample.end,
        backend=cfg.video_backend,
        num_threads=cfg.decode_threads,
    )


def process_image(
    image,
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean=QWEN_IMAGE_MEAN,
    image_std=QWEN_IMAGE_STD,
) -> ImageInputs:
    """A path, PIL image or uint8 [H, W, 3] array -> Qwen-VL image inputs (one temporal patch,
    the frame repeated ``temporal_patch_size`` times, as HF does)."""
    arr = _load_image(image)
    pixels, grid, _ = process_frames(
        arr[None],
        sampled_fps=1.0,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
        image_mean=image_mean,
        image_std=image_std,
    )
    return ImageInputs(pixel_values=pixels, image_grid_thw=grid)


def _load_image(image) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        if not os.path.isfile(name):
            raise VideoDataError(name, "missing_file", "no such file")
        try:
            with Image.open(name) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise VideoDataError(name, "unreadable", str(exc)) from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return arr
