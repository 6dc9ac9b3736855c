"""Data config: manifests, video decoding and Qwen-VL frame sampling / pixel budgets, loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vcap.config.loader import ConfigError


@dataclass
class DataConfig:
    train_manifest: str = ""
    eval_manifest: str = ""
    # Decoder: PyAV by default. decord is optional (installed only where its wheel exists);
    # when chosen, PyAV still takes over for files decord cannot open.
    video_backend: Literal["pyav", "decord"] = "pyav"
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 32
    # Per-frame pixel budget (paper: <= 360x420 per frame) and optional total budget.
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 360 * 420
    total_pixels: int | None = None
    # decord/PyAV decoder threads per process (0: the library's default).
    decode_threads: int = 0
    num_workers: int = 2
    prefetch: int = 2  # items each worker decodes ahead of the consumer
    # Workers start at the first batch, inside a trainer that already runs gloo/NCCL, OpenMP and
    # judge threads; a plain fork there can copy a held lock into the child and hang it (seen in
    # the CPU demo). forkserver forks workers from a clean single-threaded server instead.
    worker_start_method: Literal["fork", "spawn", "forkserver"] = "forkserver"
    shuffle: bool = True
    seed: int = 1234
    # What the loader does with a sample that fails to load: skip and count it, or stop.
    on_error: Literal["skip", "stop"] = "skip"
    max_prompt_tokens: int = 8192

    def validate(self) -> None:
        if self.fps <= 0:
            raise ConfigError(f"fps: must be > 0, got {self.fps}")
        if self.min_frames < 1:
            raise ConfigError(f"min_frames: must be >= 1, got {self.min_frames}")
        if self.max_frames < max(self.min_frames, 2):
            raise ConfigError(
                f"max_frames: must be >= max(min_frames, 2) = {max(self.min_frames, 2)}, "
                f"got {self.max_frames}"
            )
        if self.min_pixels < 1:
            raise ConfigError(f"min_pixels: must be >= 1, got {self.min_pixels}")
        if self.max_pixels < self.min_pixels:
            raise ConfigError(
                f"max_pixels: must be >= min_pixels ({self.min_pixels}), got {self.max_pixels}"
            )
        if self.num_workers < 0:
            raise ConfigError("num_workers: must be >= 0")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch: must be >= 1, got {self.prefetch}")
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads: must be >= 0, got {self.decode_threads}")
        if self.video_backend == "decord":
            from megatron_vcap.data.video_io import decord_available

            if not decord_available():
                raise ConfigError(
                    "video_backend: 'decord' is not installed here (it has no wheel for this "
                    "platform or Python); use 'pyav', the default"
                )
        if self.total_pixels is not None and self.total_pixels < self.min_pixels:
            raise ConfigError("total_pixels: must be >= min_pixels")
        if self.max_prompt_tokens < 1:
            raise ConfigError("max_prompt_tokens: must be >= 1")
