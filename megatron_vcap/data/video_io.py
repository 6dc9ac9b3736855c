"""Video reading: PyAV by default, decord optional; only the requested frames are decoded.

Each reader (``PyAVReader``, ``DecordReader``) holds the stream's metadata (frame count, average
fps, size) and returns ``get_frames(indices) -> uint8 [T, H, W, 3]``; ``read_video_frames`` picks
the reader, the indices and the fallback. The PyAV reader builds a packet index
by demuxing (no decoding) and seeks to the keyframe before each requested frame; decord seeks the
same way, so both decode only the GOPs that hold sampled frames and return identical frames.
PyAV is the default: it measured faster (``tools/bench_data.py``), ships wheels for every
platform (decord has none for aarch64, e.g. GH200 nodes, and no release since 2021) and bundles
its own FFmpeg. decord is used when asked for (``data.video_backend: decord``) and installed;
when it cannot open or read a file, PyAV is tried automatically. Every failure is a
:class:`VideoDataError` naming the file and carrying a short ``reason`` that the loader counts in
its metrics.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Absurd-resolution guard: past this a single frame costs gigabytes before any resize.
MAX_VIDEO_SIDE = 16384
# Qwen-VL's smart_resize rejects aspect ratios beyond this.
MAX_ASPECT_RATIO = 200
# A demuxed packet count this far below the container header's frame count means truncation.
TRUNCATION_TOLERANCE = 0.9


class VideoDataError(ValueError):
    """A video (or image) that cannot be used; ``reason`` is a short metric key."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")


@dataclass(frozen=True)
class VideoMeta:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    backend: str


def _quiet_native_logs() -> None:
    # Both libraries print ffmpeg's complaints about corrupt input to stderr; our errors say it
    # once, with the file name, instead.
    import av

    if decord_available():
        import decord

        decord.logging.set_level(decord.logging.QUIET)
    av.logging.set_level(av.logging.PANIC)


def decord_available() -> bool:
    """Whether the optional decord backend is installed (it has no wheel on some platforms)."""
    import importlib.util

    return importlib.util.find_spec("decord") is not None


def check_resolution(path: str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise VideoDataError(path, "bad_resolution", f"frame size {width}x{height}")
    if max(width, height) > MAX_VIDEO_SIDE:
        raise VideoDataError(
            path, "bad_resolution", f"frame size {width}x{height} exceeds {MAX_VIDEO_SIDE} px"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise VideoDataError(
            path,
            "bad_resolution",
            f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1",
        )


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _stderr_silenced():
    """Drop native writes to fd 2 for a moment: decord logs open failures from C++ regardless
    of its log level, and the error we raise already says what went wrong. The lock keeps
    concurrent callers from saving each other's /dev/null as the "real" stderr."""
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class DecordReader:
    """decord.VideoReader wrapper; ``get_batch`` seeks per frame, so sparse reads stay cheap."""

    def __init__(self, path: str, num_threads: int = 0):
        import decord

        with _stderr_silenced():
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        height, width = self._vr[0].shape[:2] if len(self._vr) else (0, 0)
        self._vr.seek(0)
        self.meta = VideoMeta(
            path, len(self._vr), float(self._vr.get_avg_fps()), width, height, "decord"
        )

    def get_frames(self, indices: list[int]) -> np.ndarray:
        return self._vr.get_batch(list(indices)).asnumpy()

    def close(self) -> None:
        self._vr = None


class PyAVReader:
    """PyAV reader: a packet index from demuxing (no decoding) gives exact frame counts and
    keyframe positions; reads seek to the keyframe before each wanted frame (like decord) and
    skip decoding the unwanted frames that no other frame references."""

    def __init__(self, path: str, num_threads: int = 0):
        import av

        self._container = av.open(path)
        if not self._container.streams.video:
            self._container.close()
            raise VideoDataError(path, "unreadable", "the file has no video stream")
        self._stream = self._container.streams.video[0]
        # Slice threads only: frame threading deadlocks now and then when a reader seeks or is
        # closed with frames in flight (seen with PyAV 18 under a seek/close stress loop).
        self._stream.thread_type = "SLICE"
        if num_threads:
            self._stream.thread_count = num_threads
        pts, key_pts = [], []
        for packet in self._container.demux(self._stream):
            if packet.pts is None or packet.size == 0:
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
        self._pts = sorted(pts)  # presentation order = frame index order
        self._key_pts = sorted(key_pts)
        header_frames = self._stream.frames
        if header_frames and len(self._pts) < TRUNCATION_TOLERANCE * header_frames:
            raise VideoDataError(
                path,
                "truncated",
                f"header says {header_frames} frames but only {len(self._pts)} are present",
            )
        rate = self._stream.average_rate or self._stream.guessed_rate
        ctx = self._stream.codec_context
        self.meta = VideoMeta(
            path, len(self._pts), float(rate) if rate else 0.0, ctx.width, ctx.height, "pyav"
        )

    def get_frames(self, indices: list[int]) -> np.ndarray:
        import av

        wanted = {self._pts[i]: i for i in indices}
        ctx = self._stream.codec_context
        out: dict[int, np.ndarray] = {}
        packets = None  # demux iterator, restarted at each seek
        demuxed_up_to = None  # largest pts handed to the decoder since the last seek

        def take(packet) -> None:
            try:
                frames = ctx.decode(packet)
            except av.error.FFmpegError as exc:
                where = "the end of the stream" if packet is None else f"pts {packet.pts}"
                raise VideoDataError(
                    self.meta.path, "corrupt", f"decoding failed at {where}: {exc}"
                ) from None
            for frame in frames:
                if frame.pts in wanted and wanted[frame.pts] not in out:
                    out[wanted[frame.pts]] = frame.to_ndarray(format="rgb24")

        for target in sorted(wanted):
            if wanted[target] in out:
                continue
            if packets is None or self._needs_seek(demuxed_up_to, target):
                k = bisect.bisect_right(self._key_pts, target) - 1
                key = self._key_pts[k] if k >= 0 else self._pts[0]  # no index: from the start
                self._container.seek(key, stream=self._stream, backward=True, any_frame=False)
                packets, demuxed_up_to = self._container.demux(self._stream), None
            for packet in packets:
                if packet.size == 0 or packet.pts is None:
                    continue
                demuxed_up_to = max(packet.pts, demuxed_up_to or packet.pts)
                # Frames nobody asked for that no other frame references (most B-frames) are
                # not decoded at all; the frames we keep are bit-identical either way.
                ctx.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                take(packet)
                if wanted[target] in out:
                    break
            else:  # end of stream: drain the frames the decoder still holds
                ctx.skip_frame = "DEFAULT"
                take(None)
                packets = None
            if wanted[target] not in out:
                if not out:
                    raise VideoDataError(self.meta.path, "no_frames", "no frame decodes")
                raise VideoDataError(
                    self.meta.path, "corrupt", f"frame {wanted[target]} could not be decoded"
                )
        return np.stack([out[i] for i in indices])

    def _needs_seek(self, demuxed_up_to: int | None, target: int) -> bool:
        # Seek when a keyframe lies between the decoder's position and the target: restarting
        # there is cheaper than decoding everything in between.
        if demuxed_up_to is None:
            return False
        k = bisect.bisect_right(self._key_pts, target) - 1
        return k >= 0 and self._key_pts[k] > demuxed_up_to

    def close(self) -> None:
        self._container.close()


def _open_with(backend: str, path: str, num_threads: int):
    return DecordReader(path, num_threads) if backend == "decord" else PyAVReader(path, num_threads)


def read_video_frames(
    path: str | os.PathLike,
    choose_indices,
    *,
    backend: str = "pyav",
    num_threads: int = 0,
) -> tuple[np.ndarray, VideoMeta, list[int]]:
    """Open ``path``, pick frame indices with ``choose_indices(meta) -> list[int]``, decode them.

    Returns (frames uint8 [T, H, W, 3], metadata, indices). With ``backend="decord"``, decord
    failures (open or read) fall back to PyAV; ``choose_indices`` may raise
    :class:`VideoDataError` (e.g. too short).
    """
    if backend not in ("pyav", "decord"):
        raise ValueError(f"video backend: expected 'pyav' or 'decord', got {backend!r}")
    if backend == "decord" and not decord_available():
        raise ValueError("video backend 'decord' is not installed here; use 'pyav' (the default)")
    path = str(path)
    if not Path(path).is_file():
        raise VideoDataError(path, "missing_file", "no such file")
    if os.path.getsize(path) == 0:
        raise VideoDataError(path, "unreadable", "the file is empty")
    _quiet_native_logs()
    order = [backend] if backend == "pyav" else ["decord", "pyav"]
    errors = []
    for name in order:
        reader = None
        try:
            reader = _open_with(name, path, num_threads)
            meta = reader.meta
            if meta.num_frames <= 0:
                raise VideoDataError(path, "no_frames", "the video has zero decodable frames")
            check_resolution(path, meta.width, meta.height)
            if meta.fps <= 0:
                raise VideoDataError(path, "unreadable", "the stream reports no frame rate")
            indices = choose_indices(meta)
            frames = reader.get_frames(indices)
        except VideoDataError as exc:
            # Properties of the video itself: another decoder would say the same.
            if exc.reason in ("no_frames", "bad_resolution", "too_short", "bad_range"):
                raise
            errors.append((name, exc))
            continue
        except Exception as exc:  # decoder libraries raise assorted types on bad input
            errors.append((name, exc))
            continue
        finally:
            if reader is not None:
                reader.close()
        if frames.shape[0] != len(indices) or frames.ndim != 4 or frames.shape[-1] != 3:
            errors.append((name, RuntimeError(f"decoded an unexpected shape {frames.shape}")))
            continue
        return frames, meta, indices
    reason = next(
        (e.reason for _, e in reversed(errors) if isinstance(e, VideoDataError)), "unreadable"
    )
    detail = "; ".join(f"{name}: {_short(exc).replace(path, 'the file')}" for name, exc in errors)
    raise VideoDataError(path, reason, f"cannot decode ({detail})")


def _short(exc: Exception) -> str:
    text = exc.detail if isinstance(exc, VideoDataError) else str(exc)
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def write_mp4(
    path: str | os.PathLike,
    frames,
    *,
    fps: float,
    width: int,
    height: int,
    codec: str = "libx264",
    crf: int = 18,
    gop: int | None = None,
) -> Path:
    """Encode an iterable of uint8 [height, width, 3] RGB frames as an H.264 MP4 with PyAV.

    4:2:0 chroma needs even sizes, so odd-sized videos are written as 4:4:4 (still H.264).
    """
    import fractions

    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fractions.Fraction(fps).limit_denominator(1001)
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    options = {"crf": str(crf)} if codec == "libx264" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop is not None:  # keyframe interval (frames)
            stream.codec_context.gop_size = gop
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path
