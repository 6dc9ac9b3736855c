"""Step metrics that declare how they merge: over micro-batches, then over data-parallel ranks.

Every metric a step reports is a :class:`Metric`: a float that carries its reduction, one of

* ``sum`` - counts and contributions (``loss`` is each rank's share of the global-batch loss,
  ``num_tokens``, ``*_count``, skipped samples);
* ``mean`` - an unweighted mean over the parts (a learning rate, a phase time);
* ``max`` / ``min`` - extremes (``ratio_max`` is the largest ratio on any rank);
* ``weighted_mean`` - sum(value * weight) / sum(weight); with ``weight`` = the tokens a value
  averages over this is the token-weighted mean (``clip_frac``, ``kl_mean``, ``entropy_mean``),
  with ``weight`` = samples the sample-weighted one. A part of weight 0 (e.g. a micro-batch whose
  samples were all dropped) contributes nothing; a key whose total weight is 0 is left out.

The merge never guesses a reduction from a key's spelling: a plain float refuses to merge and
names its key. ``Metric`` subclasses ``float`` so that code which only reads a number (console
line, JSON, tests) needs no unwrapping; arithmetic on it gives a plain float, which must be
declared again before it is merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.distributed as dist

__all__ = ["REDUCTIONS", "Metric", "declare", "gather_rank_metrics", "merge_metrics"]

REDUCTIONS = ("sum", "mean", "max", "min", "weighted_mean")


class Metric(float):
    """A metric value with its reduction (see the module docstring) and, for ``weighted_mean``,
    its weight (tokens or samples)."""

    __slots__ = ("reduce", "weight")

    def __new__(cls, value: float, reduce: str, weight: float = 1.0):
        if reduce not in REDUCTIONS:
            raise ValueError(
                f"metric reduction: expected one of {list(REDUCTIONS)}, got {reduce!r}"
            )
        self = super().__new__(cls, float(value))
        self.reduce = reduce
        self.weight = float(weight)
        return self

    def __reduce__(self):  # pickling (all_gather_object) keeps the declaration
        return (Metric, (float(self), self.reduce, self.weight))

    def __repr__(self) -> str:
        weight = f", weight={self.weight!r}" if self.reduce == "weighted_mean" else ""
        return f"Metric({float(self)!r}, {self.reduce!r}{weight})"


def declare(values: Mapping[str, float], reduce: str, weight: float = 1.0) -> dict[str, Metric]:
    """Every value of ``values`` as a Metric with the same reduction (and weight)."""
    return {k: Metric(v, reduce, weight) for k, v in values.items()}


def _merge_one(key: str, parts: list[Metric]) -> Metric | None:
    for m in parts:
        if not isinstance(m, Metric):
            raise TypeError(f"metric {key!r}: {m!r} declares no reduction (wrap it in Metric)")
    kinds = {m.reduce for m in parts}
    if len(kinds) > 1:
        raise ValueError(f"metric {key!r}: parts declare different reductions {sorted(kinds)}")
    kind = kinds.pop()
    values = [float(m) for m in parts]
    if kind == "sum":
        return Metric(sum(values), kind)
    if kind == "mean":
        return Metric(sum(values) / len(values), kind, weight=len(values))
    if kind == "max":
        return Metric(max(values), kind)
    if kind == "min":
        return Metric(min(values), kind)
    total = sum(m.weight for m in parts)
    if total <= 0:
        return None
    return Metric(sum(v * m.weight for v, m in zip(values, parts)) / total, kind, weight=total)


def merge_metrics(parts: Sequence[Mapping[str, Metric]]) -> dict[str, Metric]:
    """Merge metric dicts (micro-batches, or ranks) by each key's declared reduction.

    A key missing from some parts is merged over the parts that have it.
    """
    keys = sorted({k for d in parts for k in d})
    merged = {}
    for key in keys:
        value = _merge_one(key, [d[key] for d in parts if key in d])
        if value is not None:
            merged[key] = value
    return merged


def gather_rank_metrics(metrics: Mapping[str, Metric], ctx) -> dict[str, Metric]:
    """Merge this step's metrics over data-parallel ranks (every rank gets the result)."""
    group = ctx.dp_group_gloo
    if group is None or ctx.dp_size == 1:
        return merge_metrics([metrics])
    gathered: list = [None] * ctx.dp_size
    dist.all_gather_object(gathered, dict(metrics), group=group)
    return merge_metrics(gathered)
