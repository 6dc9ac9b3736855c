"""The training / rollout loader: sharded, seeded, prefetched in worker processes, resumable.

Each data-parallel rank reads an endless stream of positions ``k = 0, 1, 2, ...``. Position
``k`` lies in epoch ``k // per_rank``; that epoch's order is a permutation of all samples drawn
from ``(seed, epoch)`` (identity when ``shuffle`` is off), padded by wrapping to a multiple of
``dp_size`` so no sample is dropped, and rank ``r`` takes every ``dp_size``-th entry from ``r``.
The order therefore depends only on (seed, dp_size, number of samples), never on worker timing.

Decoding and tokenisation run in ``torch.utils.data.DataLoader`` worker processes, which keep
``prefetch`` items each in flight ahead of the consumer and deliver them in position order. The
loader's state is the number of positions consumed (plus skip counters); a checkpoint stores it
and a resumed run continues with the next position nobody has seen, whatever was prefetched.

A sample that fails to load (missing file, corrupt video, too long a prompt, ...) is either
skipped - counted by reason in ``metrics()`` and logged - or stops the run with an error naming
it, as ``DataConfig.on_error`` says.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_vcap.data.config import DataConfig
from megatron_vcap.data.manifest import Sample
from megatron_vcap.data.prompts import PromptInputs, append_target, build_prompt
from megatron_vcap.data.video_io import VideoDataError
from megatron_vcap.data.vision import VideoInputs, process_sample_video
from megatron_vcap.structure import render_response

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DataLoadError(RuntimeError):
    """Raised with ``on_error='stop'`` (or when every sample fails); names the sample."""


@dataclass
class LoaderItem:
    sample: Sample
    video: VideoInputs
    prompt: PromptInputs
    input_ids: torch.Tensor | None = None  # sft: prompt + target + <|im_end|>, int64 [S]
    labels: torch.Tensor | None = None  # sft: -100 on the prompt, int64 [S]
    epoch: int = 0
    position: int = 0  # this rank's stream position


@dataclass
class _Failure:
    position: int
    sample: Sample
    reason: str
    message: str


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """All sample indices in the order of ``epoch`` (before sharding)."""
    if not shuffle:
        return list(range(num_samples))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g).tolist()


class ShardedStream:
    """Position -> (epoch, sample index) for one data-parallel rank."""

    def __init__(self, num_samples: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool):
        if num_samples < 1:
            raise ValueError("the loader needs at least one sample")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.num_samples, self.dp_rank, self.dp_size = num_samples, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = -(-num_samples // dp_size)  # ceil
        self._cache: tuple[int, list[int]] | None = None

    def locate(self, position: int) -> tuple[int, int]:
        epoch, j = divmod(position, self.per_rank)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.num_samples, self.seed, epoch, self.shuffle))
        order = self._cache[1]
        return epoch, order[(j * self.dp_size + self.dp_rank) % self.num_samples]


class _CountFrom(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1


def _identity(x):
    return x


class _ItemDataset(Dataset):
    """Position -> processed item (or a _Failure); runs inside the worker processes."""

    def __init__(self, samples, stream: ShardedStream, cfg: DataConfig, tokenizer, mode: str):
        self.samples, self.stream, self.cfg = samples, stream, cfg
        self.tokenizer, self.mode = tokenizer, mode

    def __getitem__(self, position: int):
        epoch, index = self.stream.locate(position)
        sample = self.samples[index]
        try:
            return self._process(sample, epoch, position)
        except VideoDataError as exc:
            return _Failure(position, sample, exc.reason, str(exc))
        except (ValueError, OSError) as exc:
            return _Failure(position, sample, "invalid", f"{type(exc).__name__}: {exc}")

    def _process(self, sample: Sample, epoch: int, position: int) -> LoaderItem:
        cfg = self.cfg
        video = process_sample_video(sample, cfg)
        prompt = build_prompt(self.tokenizer, video)
        item = LoaderItem(sample, video, prompt, epoch=epoch, position=position)
        if self.mode == "sft":
            target = render_response(sample.subjects, sample.caption)
            item.input_ids, item.labels = append_target(self.tokenizer, prompt, target)
        length = len(item.input_ids if item.input_ids is not None else prompt.input_ids)
        if length > cfg.max_prompt_tokens:
            raise VideoDataError(
                sample.video,
                "too_long",
                f"{length} tokens exceed data.max_prompt_tokens={cfg.max_prompt_tokens}",
            )
        return item


class VideoLoader:
    """Iterator over processed items for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        samples: list[Sample],
        cfg: DataConfig,
        tokenizer,
        *,
        dp_rank: int,
        dp_size: int,
        seed: int,
        mode: Literal["rollout", "sft"],
    ):
        if mode not in ("rollout", "sft"):
            raise ValueError(f"mode must be 'rollout' or 'sft', got {mode!r}")
        self.cfg, self.mode = cfg, mode
        self.stream = ShardedStream(len(samples), dp_rank, dp_size, seed, cfg.shuffle)
        self._dataset = _ItemDataset(samples, self.stream, cfg, tokenizer, mode)
        self._consumed = 0
        self._skipped: Counter[str] = Counter()
        self._consecutive_failures = 0
        self._iter = None

    # -- iteration -------------------------------------------------------------------------
    def _start(self):
        cfg = self.cfg
        workers = cfg.num_workers
        # Forked workers inherit the tokenizer; its Rust thread pool must not be forked live.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(
            self._dataset,
            batch_size=None,
            sampler=_CountFrom(self._consumed),
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=cfg.prefetch if workers > 0 else None,
            multiprocessing_context=cfg.worker_start_method if workers > 0 else None,
        )
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> LoaderItem:
        while True:
            if self._iter is None:
                self._iter = self._start()
            result = next(self._iter)
            assert result.position == self._consumed, "workers delivered out of order"
            self._consumed += 1
            if isinstance(result, LoaderItem):
                self._consecutive_failures = 0
                return result
            self._on_failure(result)

    def _on_failure(self, failure: _Failure) -> None:
        where = f"sample '{failure.sample.id}' (manifest line {failure.sample.line})"
        if self.cfg.on_error == "stop":
            self.close()
            raise DataLoadError(f"{where}: {failure.message} [data.on_error=stop]")
        self._skipped[failure.reason] += 1
        self._consecutive_failures += 1
        log.warning("skipping %s: %s", where, failure.message)
        if self._consecutive_failures >= self.stream.num_samples:
            self.close()
            raise DataLoadError(
                f"{self._consecutive_failures} samples in a row failed to load; the last was "
                f"{where}: {failure.message}"
            )

    def next_batch(self, n: int) -> list[LoaderItem]:
        return [next(self) for _ in range(n)]

    def close(self) -> None:
        """Stop the worker processes (prefetched items are dropped, not consumed)."""
        self._iter = None

    # -- state -----------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        return self.stream.per_rank

    def state_dict(self) -> dict:
        s = self.stream
        return {
            "version": STATE_VERSION,
            "consumed": self._consumed,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "dp_rank": s.dp_rank,
            "dp_size": s.dp_size,
            "num_samples": s.num_samples,
            "skipped": dict(self._skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last consumed position of a saved run (this rank's state, or a
        ``{"per_rank": [...]}`` mapping from :func:`merge_rank_states`)."""
        if "per_rank" in state:
            state = state["per_rank"][self.stream.dp_rank]
        s = self.stream
        expected = {
            "version": STATE_VERSION,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "dp_rank": s.dp_rank,
            "dp_size": s.dp_size,
            "num_samples": s.num_samples,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state mismatch: saved {key}={state.get(key)!r}, this run has "
                    f"{value!r}; the order would not continue where it stopped"
                )
        self.close()
        self._consumed = int(state["consumed"])
        self._skipped = Counter(state.get("skipped", {}))
        self._consecutive_failures = 0

    def metrics(self) -> dict[str, float]:
        """Samples consumed and skipped (summed over data-parallel ranks) and the epoch."""
        from megatron_vcap.trainer.metrics import Metric

        epoch = self._consumed / self.stream.per_rank
        out = {
            "data/consumed": Metric(self._consumed, "sum"),
            "data/epoch": Metric(epoch, "mean"),
            "data/skipped": Metric(sum(self._skipped.values()), "sum"),
        }
        out.update(
            {f"data/skipped/{k}": Metric(v, "sum") for k, v in sorted(self._skipped.items())}
        )
        return out


def merge_rank_states(states: list[dict]) -> dict:
    """Every rank's ``state_dict()`` (e.g. from ``all_gather_object``) as one saveable dict."""
    ordered = sorted(states, key=lambda st: st["dp_rank"])
    if [st["dp_rank"] for st in ordered] != list(range(len(ordered))):
        raise ValueError("merge_rank_states needs exactly one state per data-parallel rank")
    return {"per_rank": ordered}


def build_loader(
    samples: list[Sample],
    data_cfg: DataConfig,
    tokenizer,
    *,
    dp_rank: int,
    dp_size: int,
    seed: int,
    mode: Literal["rollout", "sft"] = "rollout",
) -> VideoLoader:
    """The loader for one data-parallel rank (see :class:`VideoLoader`)."""
    return VideoLoader(
        samples, data_cfg, tokenizer, dp_rank=dp_rank, dp_size=dp_size, seed=seed, mode=mode
    )
