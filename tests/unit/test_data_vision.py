"""Parity of process_video / process_image with the transformers Qwen2-VL processors.

The oracle is ``transformers``' own processor fed the same decoded frames; the frame plan
(count, indices, sampled fps) is recomputed here from the written video's known length and rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_vcap.data.video_io import (
    VideoDataError,
    decord_available,
    read_video_frames,
    write_mp4,
)
from megatron_vcap.data.vision import process_image, process_video, smart_resize

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import (  # noqa: E402
    Qwen2VLVideoProcessor,
)

# (width, height, fps, frames): odd sizes, portrait, up- and down-scaling, several rates/lengths.
VIDEOS = [
    (320, 240, 30.0, 90),
    (171, 97, 24.0, 50),
    (640, 360, 25.0, 100),
    (97, 301, 12.0, 19),
    (1280, 720, 60.0, 24),
]


def textured_frames(width: int, height: int, n: int, seed: int = 0):
    """Gradients, a moving checkerboard and noise: every resize tap sees distinct values."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        img = np.empty((height, width, 3), np.uint8)
        img[..., 0] = (xx * 255 // max(width - 1, 1) + 5 * i) % 256
        img[..., 1] = (yy * 255 // max(height - 1, 1)) % 256
        img[..., 2] = (((xx + 3 * i) // 9 + yy // 9) % 2) * 200
        noise = rng.integers(0, 40, size=(height, width, 1), dtype=np.uint8)
        yield np.clip(img.astype(np.int16) + noise - 20, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = []
    for w, h, fps, n in VIDEOS:
        path = write_mp4(
            root / f"v_{w}x{h}_{int(fps)}.mp4", textured_frames(w, h, n), fps=fps, width=w, height=h
        )
        out.append((path, w, h, fps, n))
    return out


def expected_plan(total, video_fps, *, fps, min_frames, max_frames, start=None, end=None):
    """Independent restatement of the Qwen reference frame plan."""
    first, last = 0, total - 1
    if start is not None:
        first = math.ceil(start * video_fps)
    if end is not None:
        last = min(math.floor(end * video_fps), total - 1)
    clip = last - first + 1
    n = clip / video_fps * fps
    n = min(max(n, math.ceil(min_frames / 2) * 2), (max_frames // 2) * 2, clip)
    n = int(n // 2 * 2)
    idx = np.round(np.linspace(first, last, n)).astype(int).tolist()
    return idx, n / clip * video_fps


def hf_video(frames, sampled_fps, min_pixels, max_pixels):
    proc = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return proc(
        videos=[frames],
        do_sample_frames=False,
        video_metadata=[{"fps": sampled_fps, "total_num_frames": len(frames)}],
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )


# decord is optional (no wheel on aarch64): its cases run wherever it is installed.
needs_decord = pytest.mark.skipif(not decord_available(), reason="decord is not installed")
BACKENDS = ["pyav", pytest.param("decord", marks=needs_decord)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_process_video_matches_transformers(videos, backend):
    settings = dict(
        fps=2.0, min_frames=4, max_frames=16, min_pixels=128 * 28 * 28, max_pixels=360 * 420
    )
    for path, _w, _h, fps, n in videos:
        ours = process_video(path, backend=backend, **settings)
        idx, sampled_fps = expected_plan(n, fps, fps=2.0, min_frames=4, max_frames=16)
        assert ours.frame_indices == idx, path
        assert ours.sampled_fps == pytest.approx(sampled_fps)
        assert ours.second_per_grid_ts == pytest.approx(2 / sampled_fps)
        assert ours.num_frames == len(idx)
        frames, _, _ = read_video_frames(path, lambda meta, idx=idx: idx, backend=backend)
        ref = hf_video(frames, sampled_fps, settings["min_pixels"], settings["max_pixels"])
        assert ours.video_grid_thw.tolist() == ref["video_grid_thw"].tolist(), path
        assert ours.video_grid_thw.dtype == torch.long
        assert ours.pixel_values_videos.dtype == torch.float32
        assert ours.pixel_values_videos.shape == ref["pixel_values_videos"].shape
        torch.testing.assert_close(
            ours.pixel_values_videos, ref["pixel_values_videos"], atol=1e-5, rtol=0
        )
        rh, rw = ours.resized_hw
        assert rh % 28 == 0 and rw % 28 == 0 and rh * rw <= settings["max_pixels"]
        assert ours.num_tokens() == int(ref["video_grid_thw"].prod()) // 4


def test_clip_range_and_total_pixels(videos):
    path, w, h, fps, n = videos[2]  # 640x360, 25 fps, 4 s
    total_pixels = 4 * 224 * 224
    ours = process_video(
        path,
        fps=4.0,
        min_frames=4,
        max_frames=32,
        min_pixels=28 * 28 * 4,
        max_pixels=640 * 360,
        total_pixels=total_pixels,
        start=0.5,
        end=3.1,
    )
    idx, sampled_fps = expected_plan(
        n, fps, fps=4.0, min_frames=4, max_frames=32, start=0.5, end=3.1
    )
    assert ours.frame_indices == idx and idx[0] == 13 and idx[-1] == 77
    assert ours.sampled_fps == pytest.approx(sampled_fps)
    # Each temporal patch gets an even share of the total budget.
    per_frame = total_pixels / len(idx) * 2
    rh, rw = ours.resized_hw
    assert rh * rw <= per_frame
    frames, _, _ = read_video_frames(path, lambda meta: idx)
    ref = hf_video(frames, sampled_fps, 28 * 28 * 4, int(per_frame))
    assert ours.video_grid_thw.tolist() == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(
        ours.pixel_values_videos, ref["pixel_values_videos"], atol=1e-5, rtol=0
    )


def test_odd_frame_count_is_padded_like_hf(videos):
    # Patchify of an odd number of frames (already sampled) repeats the last one, as HF does.
    from megatron_vcap.data.vision import process_frames

    path, *_ = videos[1]
    frames, _, _ = read_video_frames(path, lambda meta: [0, 7, 21])
    pixels, grid, _ = process_frames(
        frames, sampled_fps=2.0, min_pixels=56 * 56, max_pixels=200 * 200
    )
    ref = hf_video(frames, 2.0, 56 * 56, 200 * 200)
    assert grid.tolist() == ref["video_grid_thw"].tolist() and grid[0, 0] == 2
    torch.testing.assert_close(pixels, ref["pixel_values_videos"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(171, 97), (640, 480), (33, 1000), (2000, 1100)])
def test_process_image_matches_transformers(size):
    w, h = size
    img = next(textured_frames(w, h, 1, seed=3))
    ours = process_image(img, min_pixels=56 * 56, max_pixels=512 * 28 * 28)
    ref = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=512 * 28 * 28)(
        images=[img], return_tensors="pt"
    )
    assert ours.image_grid_thw.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_agrees_with_transformers():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 4000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 300)) * 28 * 28
        hi = lo + int(rng.integers(0, 2000)) * 28 * 28
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


def test_bad_videos_raise_named_errors(tmp_path, videos):
    good = videos[0][0]
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoDataError, match="missing.mp4: missing_file"):
        process_video(missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoDataError, match="garbage.mp4: unreadable"):
        process_video(garbage)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VideoDataError, match="truncated.mp4"):
        process_video(truncated)
    one = write_mp4(tmp_path / "one.mp4", textured_frames(64, 64, 1), fps=10, width=64, height=64)
    with pytest.raises(VideoDataError, match="one.mp4: too_short"):
        process_video(one)
    thin = write_mp4(tmp_path / "thin.mp4", textured_frames(600, 2, 4), fps=10, width=600, height=2)
    with pytest.raises(VideoDataError, match="thin.mp4: bad_resolution"):
        process_video(thin)
    with pytest.raises(VideoDataError, match="bad_range"):
        process_video(good, start=5.0, end=6.0)
    # Intact container index, every coded frame zeroed: nothing decodes.
    data = bytearray(good.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    for backend in ("pyav", "decord") if decord_available() else ("pyav",):
        with pytest.raises(VideoDataError, match="zeroed.mp4: corrupt: .*decoding failed"):
            process_video(zeroed, backend=backend)


@needs_decord
def test_pyav_reader_returns_decord_frames_bit_exactly(tmp_path):
    """The PyAV reader seeks by keyframe and skips unreferenced frames; what it returns must
    still be exactly what decord decodes, for sparse, dense and unordered requests."""
    import av

    path = write_mp4(
        tmp_path / "gop.mp4",
        textured_frames(96, 64, 90, seed=5),
        fps=30.0,
        width=96,
        height=64,
        gop=10,
    )
    with av.open(str(path)) as c:
        kinds = [int(f.pict_type) for f in c.decode(c.streams.video[0])]  # 1 I, 2 P, 3 B
    assert kinds.count(1) >= 5 and kinds.count(3) >= 20  # seeks and skippable frames
    rng = np.random.default_rng(0)
    requests = [
        [0, 89],
        list(range(90)),
        sorted(rng.choice(90, 12, replace=False).tolist()),
        [57, 3, 3, 88, 12],
        [41],
    ]
    for indices in requests:
        a, meta_a, _ = read_video_frames(path, lambda m, i=indices: i, backend="decord")
        b, meta_b, _ = read_video_frames(path, lambda m, i=indices: i, backend="pyav")
        assert (meta_a.num_frames, meta_a.fps) == (meta_b.num_frames, meta_b.fps) == (90, 30.0)
        assert meta_b.backend == "pyav"
        np.testing.assert_array_equal(a, b)


def test_pyav_is_the_default_and_a_missing_decord_is_a_config_error(monkeypatch, tmp_path):
    import megatron_vcap.data.video_io as video_io
    from megatron_vcap.config.loader import ConfigError
    from megatron_vcap.data.config import DataConfig

    assert DataConfig().video_backend == "pyav"
    path = write_mp4(tmp_path / "a.mp4", textured_frames(32, 32, 4, seed=1), fps=4.0,
                     width=32, height=32)  # fmt: skip
    _, meta, _ = read_video_frames(path, lambda m: [0, 3])
    assert meta.backend == "pyav"
    monkeypatch.setattr(video_io, "decord_available", lambda: False)
    with pytest.raises(ConfigError, match="video_backend: 'decord' is not installed"):
        DataConfig(video_backend="decord").validate()
    with pytest.raises(ValueError, match="'decord' is not installed"):
        read_video_frames(path, lambda m: [0], backend="decord")
