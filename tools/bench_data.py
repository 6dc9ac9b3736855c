"""Benchmark: video decode + Qwen-VL preprocessing throughput, ours against the usual baseline.

Baseline (what most Qwen-VL training code runs): ``qwen_vl_utils.fetch_video`` (decord reader,
frame sampling, bicubic resize) followed by the ``transformers`` Qwen2-VL video processor.
Ours: ``megatron_vcap.data.process_video`` with PyAV (the default backend) and, where installed,
decord; ``torchcodec`` decoding followed by our preprocessing is timed too when it imports. All
read the same MP4 files with the same sampling settings and the same torch thread count, in the
same process, alternating pass by pass; the script prints frames/s and videos/s for each and the
ratio, then (``--profile``) where ours spends its time (index, decode + RGB conversion, resize,
normalise + patchify) per video.
It also checks that both produce the same grids and reports how far the pixel values differ
(the baseline resizes in float before the processor, so small differences are expected).

    python tools/bench_data.py                      # synthetic test videos, default settings
    python tools/bench_data.py --set heldout --profile   # the held-out shapes (1080p, 41 s, ...)
    python tools/bench_data.py --videos 'data/*.mp4' --fps 2 --max-frames 32

Needs the optional ``qwen-vl-utils`` package (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path

# (width, height, fps, seconds): common web-video shapes, one odd-sized.
DEFAULT_VIDEOS = [
    (640, 360, 30.0, 8.0),
    (640, 360, 30.0, 8.0),
    (1280, 720, 30.0, 5.0),
    (854, 480, 25.0, 6.0),
    (480, 640, 30.0, 6.0),
    (853, 479, 24.0, 6.0),
]
# The shapes of issue 15's held-out clips: 1920x1080 at 24 fps, a long 41 s clip at 25 fps,
# 60 fps portrait, 29.97 fps at an odd 334x202.
HELDOUT_VIDEOS = [
    (1920, 1080, 24.0, 5.0),
    (640, 360, 25.0, 41.0),
    (720, 1280, 60.0, 4.0),
    (334, 202, 30000 / 1001, 8.0),
]


def _web_like_frames(width: int, height: int, n: int, seed: int):
    """A camera panning over a smooth textured scene, three moving objects, sensor noise:
    content that x264 codes at web-like bitrates with the usual I/P/B frame mix."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    pan = 3 * n + 64
    coarse = torch.from_numpy(rng.random((1, 3, height // 12 + 4, (width + pan) // 12 + 4)))
    field = F.interpolate(coarse.float(), scale_factor=12, mode="bicubic", align_corners=False)
    field = (field[0].permute(1, 2, 0).clamp(0, 1) * 200 + 25).numpy().astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    objects = [
        (
            rng.uniform(0, width),
            rng.uniform(0, height),
            rng.uniform(-4, 4),
            rng.uniform(-3, 3),
            rng.uniform(0.05, 0.12) * min(width, height),
            rng.integers(0, 256, 3),
        )
        for _ in range(3)
    ]
    for k in range(n):
        img = field[:height, 3 * k : 3 * k + width].copy()
        for x0, y0, vx, vy, r, color in objects:
            cx, cy = (x0 + vx * k) % width, (y0 + vy * k) % height
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = color
        noise = rng.integers(-6, 7, size=img.shape, dtype=np.int16)
        yield np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_videos(work_dir: Path, shapes=DEFAULT_VIDEOS) -> list[Path]:
    """A benchmark set (cached in ``work_dir``)."""
    from megatron_vcap.data.video_io import write_mp4

    work_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h, fps, secs) in enumerate(shapes):
        path = work_dir / f"web_{i}_{w}x{h}_{fps:.2f}fps_{secs:g}s.mp4"
        if not path.is_file():
            frames = _web_like_frames(w, h, int(fps * secs), seed=i)
            write_mp4(path, frames, fps=fps, width=w, height=h, crf=23)
        paths.append(path)
    return paths


def run_ours(paths, s, backend: str = "pyav") -> tuple[int, list]:
    from megatron_vcap.data.vision import process_video

    frames, outs = 0, []
    for p in paths:
        v = process_video(
            p,
            fps=s.fps,
            min_frames=s.min_frames,
            max_frames=s.max_frames,
            min_pixels=s.min_pixels,
            max_pixels=s.max_pixels,
            backend=backend,
        )
        frames += v.num_frames
        outs.append((v.video_grid_thw, v.pixel_values_videos))
    return frames, outs


def _plan(meta_frames: int, meta_fps: float, s):
    from megatron_vcap.data.vision import compute_num_frames, sample_frame_indices

    n = compute_num_frames(
        meta_frames, meta_fps, fps=s.fps, min_frames=s.min_frames, max_frames=s.max_frames
    )
    return sample_frame_indices(0, meta_frames - 1, n), n / meta_frames * meta_fps


def run_torchcodec(paths, s) -> tuple[int, list]:
    """torchcodec decoding (exact seeks), then our resize / normalise / patchify."""
    from torchcodec.decoders import VideoDecoder

    from megatron_vcap.data.vision import process_frames

    frames, outs = 0, []
    for p in paths:
        dec = VideoDecoder(str(p), device="cpu", seek_mode="exact", num_ffmpeg_threads=1)
        meta = dec.metadata
        indices, sampled_fps = _plan(meta.num_frames, meta.average_fps, s)
        data = dec.get_frames_at(indices).data.permute(0, 2, 3, 1)  # [T, H, W, 3] uint8
        pixels, grid, _ = process_frames(
            data, sampled_fps=sampled_fps, min_pixels=s.min_pixels, max_pixels=s.max_pixels
        )
        frames += len(indices)
        outs.append((grid, pixels))
    return frames, outs


def profile_ours(paths, s, backend: str) -> None:
    """Where process_video's time goes, per video (median of 3): reader open + index, decode
    with RGB conversion, resize, normalise + patchify."""
    from megatron_vcap.data.video_io import DecordReader, PyAVReader
    from megatron_vcap.data.vision import patchify, resize_frames, smart_resize

    reader_cls = PyAVReader if backend == "pyav" else DecordReader

    def timed(fn):
        runs = []
        for _ in range(3):
            t = time.process_time()
            out = fn()
            runs.append(time.process_time() - t)
        return statistics.median(runs) * 1000, out

    print(f"profile ({backend}), cpu ms per video:")
    for p in paths:
        t_open, reader = timed(lambda p=p: reader_cls(str(p)))
        meta = reader.meta
        indices, _ = _plan(meta.num_frames, meta.fps, s)
        reader.close()

        def decode(p=p, indices=indices):
            r = reader_cls(str(p))
            try:
                return r.get_frames(indices)
            finally:
                r.close()

        t_decode, frames = timed(decode)
        rh, rw = smart_resize(meta.height, meta.width, 28, s.min_pixels, s.max_pixels)
        t_resize, resized = timed(lambda f=frames, h=rh, w=rw: resize_frames(f, h, w))
        t_patch, _ = timed(
            lambda r=resized: patchify(r, patch_size=14, temporal_patch_size=2, merge_size=2)
        )
        print(
            f"  {p.name:40s} {len(indices):2d} frames {meta.width}x{meta.height} -> {rw}x{rh}: "
            f"open+index {t_open:6.0f}  decode+rgb {t_decode - t_open:6.0f}  "
            f"resize {t_resize:6.0f}  normalise+patchify {t_patch:5.0f}"
        )


def run_baseline(paths, s, processor) -> tuple[int, list]:
    from qwen_vl_utils import fetch_video

    frames, outs = 0, []
    for p in paths:
        ele = {
            "video": str(p),
            "fps": s.fps,
            "min_frames": s.min_frames,
            "max_frames": s.max_frames,
            "min_pixels": s.min_pixels,
            "max_pixels": s.max_pixels,
        }
        video, sample_fps = fetch_video(ele, return_video_sample_fps=True)
        out = processor(
            videos=[video],
            do_sample_frames=False,
            video_metadata=[{"fps": sample_fps, "total_num_frames": len(video)}],
            cap_pixels_per_frame=False,
            return_tensors="pt",
        )
        frames += len(video)
        outs.append((out["video_grid_thw"], out["pixel_values_videos"]))
    return frames, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", help="glob of MP4 files (default: generated test videos)")
    ap.add_argument("--work-dir", default="outputs/bench_data", help="where test videos go")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--min-frames", type=int, default=4)
    ap.add_argument("--max-frames", type=int, default=32)
    ap.add_argument("--min-pixels", type=int, default=128 * 28 * 28)
    ap.add_argument("--max-pixels", type=int, default=360 * 420)
    ap.add_argument("--set", choices=["default", "heldout"], default="default",
                    help="generated video shapes (ignored with --videos)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="per-stage times of ours (PyAV)")
    s = ap.parse_args(argv)
    from megatron_vcap.data.video_io import decord_available

    # The baseline as most training code runs it: qwen-vl-utils' decord reader where installed
    # (it reads this variable when imported, so it is set first).
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord" if decord_available() else "torchvision"
    try:
        import qwen_vl_utils  # noqa: F401
    except ImportError:
        print(
            "bench_data: the baseline needs qwen-vl-utils: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    import logging

    import torch
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    logging.getLogger("qwen_vl_utils").setLevel(logging.ERROR)
    torch.set_num_threads(s.threads)
    shapes = HELDOUT_VIDEOS if s.set == "heldout" else DEFAULT_VIDEOS
    paths = (
        sorted(Path(p) for p in glob.glob(s.videos))
        if s.videos
        else make_videos(Path(s.work_dir) / s.set, shapes)
    )
    if not paths:
        print(f"bench_data: no videos match {s.videos}", file=sys.stderr)
        return 2
    processor = Qwen2VLVideoProcessor(min_pixels=s.min_pixels, max_pixels=s.max_pixels)

    runners = {
        "baseline": (
            f"qwen-vl-utils ({os.environ['FORCE_QWENVL_VIDEO_READER']}) + HF processor",
            lambda: run_baseline(paths, s, processor),
        ),
        "pyav": ("ours, process_video (pyav, default)", lambda: run_ours(paths, s, "pyav")),
    }
    if decord_available():
        runners["decord"] = ("ours, process_video (decord)", lambda: run_ours(paths, s, "decord"))
    try:
        run_torchcodec(paths[:1], s)  # it imports lazily: decode once to know it works
        runners["torchcodec"] = ("torchcodec decode + our preprocessing",
                                 lambda: run_torchcodec(paths, s))  # fmt: skip
    except Exception as exc:  # not installed, or no FFmpeg libraries it can load
        print(f"(torchcodec not timed: {str(exc).splitlines()[0][:100]})")
    # Warm-up pass (imports, allocator, file cache) and a correctness comparison.
    results = {name: fn() for name, (_, fn) in runners.items()}
    for name in [n for n in runners if n != "baseline"]:
        ours, base = results[name][1], results["baseline"][1]
        grids = all(a[0].tolist() == b[0].tolist() for a, b in zip(ours, base))
        diff = max(
            float((a[1] - b[1]).abs().max()) if a[1].shape == b[1].shape else float("inf")
            for a, b in zip(ours, base)
        )
        print(
            f"check {name}: grids {'identical' if grids else 'DIFFER'}, max |pixel difference| "
            f"vs baseline {diff:.3g} (the baseline resizes in float before the processor)"
        )
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(s.repeats):  # interleaved, so load from other processes hits all alike
        for name, (_, fn) in runners.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)

    frames = results["pyav"][0]
    print(
        f"{len(paths)} videos, {frames} sampled frames per pass; fps={s.fps}, frames "
        f"{s.min_frames}..{s.max_frames}, pixels {s.min_pixels}..{s.max_pixels}; torch "
        f"threads {s.threads}; median of {s.repeats} interleaved passes"
    )
    base_wall, base_cpu = statistics.median(wall["baseline"]), statistics.median(cpu["baseline"])
    for name, (label, _) in runners.items():
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        ratio = (
            ""
            if name == "baseline"
            else (f"  speed-up x{base_wall / w:.2f} (wall), x{base_cpu / c:.2f} (cpu)")
        )
        print(
            f"{label:42s} {results[name][0] / w:7.1f} frames/s {len(paths) / w:6.2f} videos/s "
            f"cpu {c / len(paths) * 1000:5.0f} ms/video{ratio}"
        )
    print(
        "target: >= 2x over the baseline. On a shared machine the CPU-time ratio is the "
        "steadier figure; wall-clock includes other processes' load."
    )
    if s.profile:
        profile_ours(paths, s, "pyav")
    return 0


if __name__ == "__main__":
    sys.exit(main())
