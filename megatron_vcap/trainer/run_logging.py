"""Where a run's log records go: a quiet console and a full log file per rank in the run dir.

Default (quiet): every rank writes everything — our INFO records, Megatron's and the libraries'
records and Python warnings (``logging.captureWarnings``) — to ``<run_dir>/logs/rank_NNNNN.log``.
The console then shows, from rank 0 only, the start-up summary, the step lines (printed by the
metrics logger) and our own warnings and errors; a crash's traceback still reaches stderr on
every rank. ``--verbose`` keeps the file and sends every record of every rank to the console as
well, Python warnings included.

torch installs its own stderr handler on the ``torch`` logger (records such as "No CUDA runtime
is found"); in quiet mode that handler is swapped for the file for the duration of the run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Loggers whose console records stay on the console in quiet mode (rank 0, WARNING and up).
OWN_LOGGER = "megatron_vcap"
# Libraries that install stderr handlers of their own (propagate=False).
_SELF_HANDLED = ("torch",)


class _OwnWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")


class RunLogging:
    """Installed handlers, removable (a process may run several trainings, e.g. tests)."""

    def __init__(self, log_file: Path, handlers: list, swapped: dict, captured: bool):
        self.log_file = log_file
        self._handlers, self._swapped, self._captured = handlers, swapped, captured

    def close(self) -> None:
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        for name, (old, new) in self._swapped.items():
            logger = logging.getLogger(name)
            for h in new:
                logger.removeHandler(h)
            for h in old:
                logger.addHandler(h)
        if self._captured:
            logging.captureWarnings(False)


_active: RunLogging | None = None


def setup_run_logging(
    run_dir: str | Path, rank: int, *, verbose: bool, file_name: str | None = None
) -> RunLogging:
    """Route this process's log records (see the module docstring) to
    ``<run_dir>/logs/<file_name or rank_NNNNN.log>``; replaces an earlier setup."""
    global _active
    if _active is not None:
        _active.close()
    log_file = Path(run_dir) / "logs" / (file_name or f"rank_{rank:05d}.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, mode="a")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.DEBUG)
    handlers: list[logging.Handler] = [file_handler]
    root = logging.getLogger()
    # basicConfig-style handlers someone else installed would print every record a second time.
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    if verbose:
        console.setLevel(logging.INFO)
        handlers.append(console)
    elif rank == 0:
        console.setLevel(logging.WARNING)
        console.addFilter(_OwnWarnings())
        handlers.append(console)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    swapped = {}
    if not verbose:
        import torch  # noqa: F401  (installs the handlers swapped below)

        logging.captureWarnings(True)
        for name in _SELF_HANDLED:
            logger = logging.getLogger(name)
            # torch's is a logging._StderrHandler, not a StreamHandler: keep only files.
            old = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
            for h in old:
                logger.removeHandler(h)
            logger.addHandler(file_handler)
            swapped[name] = (old, [file_handler])
    _active = RunLogging(log_file, handlers, swapped, captured=not verbose)
    return _active


def count_parameters(model, ctx) -> int:
    """Parameters of the whole model (summed over the tensor- and pipeline-parallel shards;
    TP-replicated tensors such as norms are counted once per TP rank, a small overcount)."""
    import torch
    import torch.distributed as dist

    local = torch.tensor([sum(p.numel() for p in model.parameters())], dtype=torch.float64)
    if dist.is_initialized():
        for size, group in ((ctx.tp_size, ctx.tp_group), (ctx.pp_size, ctx.pp_group)):
            if size > 1:
                dist.all_reduce(local, group=group)
    return int(local.item())


def startup_summary(cfg, ctx, check, *, num_params: int, num_samples: int, log_file) -> str:
    """The console's start-up block: layout, model size, data, judge, run dir, log file."""
    steps = f"{cfg.train.mode} for {cfg.train.steps} steps"
    if cfg.train.mode == "grpo":
        steps += f" ({cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size} samples per step)"
    else:
        steps += f" (global batch {cfg.train.global_batch_size})"
    lines = [
        f"[vcap] {steps}",
        f"[vcap] layout: TP{ctx.tp_size} x PP{ctx.pp_size} x DP{ctx.dp_size} on "
        f"{ctx.world_size} rank(s), {cfg.parallel.backend or 'auto'} backend, {ctx.device}",
        f"[vcap] model: {check.model_dir} ({num_params / 1e6:.2f}M parameters, "
        f"{cfg.model.params_dtype}, {cfg.model.transformer_impl} layers)",
        f"[vcap] data: {check.manifest} ({num_samples} samples)",
    ]
    if cfg.train.mode == "grpo":
        judge = check.judge or cfg.judge.kind
        lines.append(f"[vcap] judge: {judge}; caption score {cfg.reward.caption_score}")
    lines.append(f"[vcap] run dir: {cfg.train.run_dir}; full log: {log_file}")
    return "\n".join(lines)
