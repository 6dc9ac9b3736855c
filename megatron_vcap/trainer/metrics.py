"""Per-step metrics merged over data-parallel ranks (every rank gets the merged dict)."""

from __future__ import annotations

import torch.distributed as dist


def _merge(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Counts (``*_count``, ``count/*``, the loader's consumed / skipped samples) and ``loss``
    (each rank holds its contribution to the global-batch loss) are summed over ranks;
    everything else is averaged."""
    keys = sorted({k for d in dicts for k in d})
    merged = {}
    for key in keys:
        values = [float(d[key]) for d in dicts if key in d]
        is_count = (
            key in ("loss", "data/consumed")
            or key.endswith("_count")
            or "/count" in key
            or key.startswith(("count/", "data/skipped"))
        )
        merged[key] = sum(values) if is_count else sum(values) / len(values)
    return merged


def gather_rank_metrics(metrics: dict[str, float], ctx) -> dict[str, float]:
    """Merge this step's metrics over data-parallel ranks (every rank gets the result)."""
    metrics = {k: float(v) for k, v in metrics.items()}
    group = ctx.dp_group_gloo
    if group is None or ctx.dp_size == 1:
        return metrics
    gathered: list = [None] * ctx.dp_size
    dist.all_gather_object(gathered, metrics, group=group)
    return _merge(gathered)
