"""Step logging: a console line with a time breakdown, ``metrics.jsonl`` in the run dir, wandb.

wandb runs online only when an API key is configured (``WANDB_API_KEY`` or a prior login);
otherwise it runs in offline mode and the run can be synced later. The key is never printed or
written into the run directory. Only the logging rank (last pipeline stage, first TP/DP rank)
writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Phases shown in the console time breakdown, in order.
PHASES = ("rollout", "reward_wait", "ref_logp", "update")


class PhaseTimer:
    """Accumulates wall time per named phase within a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict:
        """``time/<phase>`` seconds, averaged over data-parallel ranks when merged."""
        from megatron_vcap.trainer.metrics import Metric

        return {f"time/{k}": Metric(v, "mean") for k, v in self.seconds.items()}


class MetricsLogger:
    def __init__(self, run_dir: str | Path, logging_cfg, *, enabled: bool, config_dict: dict):
        self.enabled = enabled
        self.cfg = logging_cfg
        self.run_dir = Path(run_dir)
        self._file = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open)
        if logging_cfg.wandb:
            self._wandb = self._init_wandb(config_dict)

    def _init_wandb(self, config_dict: dict):
        try:
            import wandb
        except ImportError:
            log.warning("logging.wandb is true but wandb is not installed; skipping wandb")
            return None
        has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        if mode == "offline":
            log.info("wandb: no API key configured, logging offline to %s", self.run_dir)
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity or None,
            name=self.cfg.run_name or self.run_dir.name,
            dir=str(self.run_dir),
            config=config_dict,
            mode=mode,
        )

    def log(self, step: int, metrics: dict[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "mode": prefix, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        if step % self.cfg.log_interval == 0:
            print(format_console_line(step, prefix, metrics), flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_console_line(step: int, prefix: str, m: dict[str, float]) -> str:
    parts = [f"[{prefix}] step {step}"]
    for key, fmt in (
        ("reward/total_mean", "reward {:.3f}"),
        ("reward/format_mean", "fmt {:.2f}"),
        ("reward/think_mean", "think {:.3f}"),
        ("reward/caption_mean", "cap {:.3f}"),
        ("loss", "loss {:.4f}"),
        ("kl", "kl {:.4f}"),
        ("clip_frac", "clip {:.3f}"),
        ("response_len", "len {:.0f}"),
        ("tokens_per_s", "{:.0f} tok/s"),
        ("lr", "lr {:.2e}"),
    ):
        if key in m:
            parts.append(fmt.format(m[key]))
    times = [f"{p} {m[f'time/{p}']:.1f}s" for p in PHASES if f"time/{p}" in m]
    if times:
        parts.append("(" + ", ".join(times) + ")")
    return " | ".join(parts)
