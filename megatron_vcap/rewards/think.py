"""Rule rewards: the format score and the LLM-free think score (Tscore), DESIGN.md §6.

Tscore matches predicted subjects to ground-truth subjects one-to-one by description similarity
(Hungarian assignment; pairs under ``subject_threshold`` stay unmatched), then, inside each
matched pair, attributes to attributes and actions to actions one-to-one above
``item_threshold``. Items of unmatched subjects count as false positives (predicted) or false
negatives (ground truth). Attribute and action F1 are micro-averaged over the whole response;
Tscore is their mean, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from megatron_vcap.rewards.parser import ParsedResponse
from megatron_vcap.structure import Subject


def compute_format_score(parsed: ParsedResponse) -> float:
    """1.0 for one non-empty think block (with >= 1 parseable subject) then one non-empty answer."""
    return 1.0 if parsed.failure is None and parsed.subjects and parsed.caption else 0.0


def match_one_to_one(sim: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Maximum-total-similarity one-to-one matching keeping only pairs with sim >= threshold.

    sim: [n_pred, n_gt]. Sub-threshold entries are zeroed before the assignment so that the
    solver never spends a row on a pair that would then be discarded.
    Returns (pred_index, gt_index, similarity) triples sorted by pred_index.
    """
    if sim.size == 0:
        return []
    masked = np.where(sim >= threshold, sim, 0.0)
    rows, cols = linear_sum_assignment(masked, maximize=True)
    return [
        (int(r), int(c), float(sim[r, c])) for r, c in zip(rows, cols) if sim[r, c] >= threshold
    ]


def compute_f1(tp: int, n_pred: int, n_gt: int) -> float:
    """Micro F1 = 2 tp / (n_pred + n_gt); 1.0 when both are empty (nothing to find or invent)."""
    if n_pred + n_gt == 0:
        return 1.0
    return 2.0 * tp / (n_pred + n_gt)


@dataclass
class TscoreResult:
    score: float
    attribute_f1: float
    action_f1: float
    # pred subject index -> gt subject index, and the counts behind each F1.
    subject_pairs: list[tuple[int, int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def texts_of(subjects: Sequence[Subject]) -> list[str]:
    """Every string the think score compares (for batching a backend's ``prepare``)."""
    out = []
    for s in subjects:
        out.append(s.description)
        out.extend(s.attributes)
        out.extend(s.actions)
    return out


def compute_tscore(
    pred: Sequence[Subject],
    gt: Sequence[Subject],
    similarity,
    *,
    subject_threshold: float,
    item_threshold: float,
) -> TscoreResult:
    """Think score of predicted vs ground-truth subjects (see the module docstring).

    ``similarity`` is a backend with ``matrix(rows, cols, kind) -> [len(rows), len(cols)]``,
    ``kind`` one of ``"subject"``, ``"attribute"``, ``"action"`` (rows predicted, cols truth).
    """
    sim = similarity.matrix(
        [s.description for s in pred], [s.description for s in gt], kind="subject"
    )
    pairs = match_one_to_one(sim, subject_threshold)
    tp = {"attributes": 0, "actions": 0}
    for p, g, _ in pairs:
        for key in tp:
            p_items, g_items = getattr(pred[p], key), getattr(gt[g], key)
            if p_items and g_items:
                item_sim = similarity.matrix(p_items, g_items, kind=key[:-1])
                tp[key] += len(match_one_to_one(item_sim, item_threshold))
    counts = {
        "subjects_pred": len(pred),
        "subjects_gt": len(gt),
        "subjects_matched": len(pairs),
    }
    f1 = {}
    for key in tp:
        n_pred = sum(len(getattr(s, key)) for s in pred)
        n_gt = sum(len(getattr(s, key)) for s in gt)
        counts.update({f"{key}_tp": tp[key], f"{key}_pred": n_pred, f"{key}_gt": n_gt})
        f1[key] = compute_f1(tp[key], n_pred, n_gt)
    return TscoreResult(
        score=(f1["attributes"] + f1["actions"]) / 2.0,
        attribute_f1=f1["attributes"],
        action_f1=f1["actions"],
        subject_pairs=[(p, g) for p, g, _ in pairs],
        counts=counts,
    )
