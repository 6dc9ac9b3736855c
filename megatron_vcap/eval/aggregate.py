"""Benchmark aggregation, exactly as EVAL_PROTOCOLS.md states it (pure functions on records).

* AutoDQ (DREAM-1K, CAREBENCH): per group the mean recall and mean precision over its scored
  samples; DREAM-1K's overall is the **macro mean over its subsets** of R and of P, CAREBENCH's the
  mean over all samples (one group); **F1 = 2RP / (R + P) of those means**, never the mean of
  per-sample F1. Failed samples (``"error"`` in the record) are left out and counted.
* DREAM-1K bucket tables pool samples by ``n_subjects``, ``n_shots`` and ``n_events``.
* VDC: per video the share of "yes" and the mean score; per type the mean over videos; the
  average is the mean over types. ``official`` drops videos whose accuracy or score is 0 (as the
  benchmark's offline script does), ``unbiased`` keeps them (as lmms-eval does).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

# (label, low, high) inclusive; None is open-ended.
SUBJECT_BUCKETS = (("<=1", None, 1), ("2", 2, 2), ("3", 3, 3), (">=4", 4, None))
SHOT_BUCKETS = (("1", None, 1), ("2", 2, 2), ("3", 3, 3), (">=4", 4, None))
EVENT_BUCKETS = (("<=3", None, 3), ("4-5", 4, 5), ("6-7", 6, 7), (">=8", 8, None))
BUCKETS = {"n_subjects": SUBJECT_BUCKETS, "n_shots": SHOT_BUCKETS, "n_events": EVENT_BUCKETS}


def compute_f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def prf(records: list[dict]) -> dict[str, float]:
    """Mean P and R of scored records and the F1 of those means."""
    p, r = _mean(x["precision"] for x in records), _mean(x["recall"] for x in records)
    return {"f1": compute_f1(p, r), "precision": p, "recall": r, "n": len(records)}


def macro_prf(blocks: dict[str, dict]) -> dict[str, float]:
    """Macro mean of per-group P and R (groups with scored samples), then F1 of the means."""
    used = [b for b in blocks.values() if b["n"] > 0]
    p, r = _mean(b["precision"] for b in used), _mean(b["recall"] for b in used)
    return {"f1": compute_f1(p, r), "precision": p, "recall": r, "n": sum(b["n"] for b in used)}


def group_prf(records: list[dict], key: str, order: Iterable[str] = ()) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {g: [] for g in order}
    for rec in records:
        groups.setdefault(rec[key], []).append(rec)
    return {g: prf(rs) for g, rs in groups.items() if rs or g in order}


def _bucket(value: int | None, buckets) -> str | None:
    if value is None:
        return None
    for label, low, high in buckets:
        if (low is None or value >= low) and (high is None or value <= high):
            return label
    return None


def bucket_tables(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Per ``n_subjects`` / ``n_shots`` / ``n_events`` bucket: P, R, F1 pooled over samples."""
    tables = {}
    for field_name, buckets in BUCKETS.items():
        rows: dict[str, list[dict]] = defaultdict(list)
        for rec in records:
            label = _bucket(rec.get("meta", {}).get(field_name), buckets)
            if label is not None:
                rows[label].append(rec)
        tables[field_name] = {label: prf(rows[label]) for label, _, _ in buckets if rows[label]}
    return tables


def scored(records: list[dict]) -> tuple[list[dict], int]:
    ok = [r for r in records if "error" not in r]
    return ok, len(records) - len(ok)


def aggregate_dream(records: list[dict], subsets: Iterable[str]) -> dict:
    """DREAM-1K: subsets, the macro overall and the bucket tables (records: group, P, R, meta)."""
    ok, failed = scored(records)
    blocks = group_prf(ok, "group", subsets)
    return {
        "overall": macro_prf(blocks),
        "subsets": blocks,
        "buckets": bucket_tables(ok),
        "failed": failed,
        "num_samples": len(records),
    }


def aggregate_carebench(records: list[dict]) -> dict:
    """CAREBENCH: ``action`` and ``object`` overall and per category. A record holds
    ``action`` / ``object`` sub-records (each P and R, or ``error``) and its ``group``."""
    out: dict = {"num_samples": len(records)}
    for branch in ("action", "object"):
        rows = [{**r[branch], "group": r["group"]} for r in records if branch in r]
        ok, failed = scored(rows)
        cats = group_prf([r for r in ok if r["group"]], "group")
        out[branch] = {"overall": prf(ok), "categories": cats, "failed": failed}
    out["failed"] = sum(
        1 for r in records if any("error" in r.get(b, {}) for b in ("action", "object"))
    )
    return out


def aggregate_vdc(videos: dict[str, list[dict]], mode: str) -> dict:
    """``videos``: type -> per-video ``{accuracy, score}`` (videos with at least one usable QA).
    Returns ``types.<t>.{accuracy, score, n}`` and ``average.{accuracy, score}``."""
    if mode not in ("official", "unbiased"):
        raise ValueError(f"vdc aggregation: expected official or unbiased, got {mode!r}")
    types = {}
    for vtype, rows in videos.items():
        if mode == "official":
            rows = [v for v in rows if v["accuracy"] != 0 and v["score"] != 0]
        types[vtype] = {
            "accuracy": _mean(v["accuracy"] for v in rows),
            "score": _mean(v["score"] for v in rows),
            "n": len(rows),
        }
    used = [t for t in types.values() if t["n"] > 0]
    average = {
        "accuracy": _mean(t["accuracy"] for t in used),
        "score": _mean(t["score"] for t in used),
    }
    return {"types": types, "average": average}
