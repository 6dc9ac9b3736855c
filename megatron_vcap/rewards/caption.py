"""Caption scores from judge verdicts: Escore (event coverage) and CNscore (coverage + naturalness).

Pure functions; the judge calls that produce the verdicts and ratings live in ``judges``.

* Escore (DESIGN.md §6, DREAM-1K AutoDQ protocol): each ground-truth event gets a verdict
  (entailment / neutral / contradiction) against the model's caption; only entailment counts.
  coverage = entailed / total. Modes: ``step`` (the paper: 0 below δ1, 0.5 below δ2, else 1),
  ``linear`` (coverage itself) and ``f1`` (adds precision: the caption's own events checked
  against the reference caption, penalising hallucination).
* CNscore: the judge rates coverage and naturalness 0-10 each; CNscore = (c + n) / 20.
"""

from __future__ import annotations

from collections.abc import Sequence

VERDICTS = ("entailment", "neutral", "contradiction")

# Coverage is a ratio of small integers; comparing with a little slack keeps "exactly δ" on the
# upper step even if a caller computes the ratio in a different order.
_EPS = 1e-9


def compute_coverage(verdicts: Sequence[str]) -> float:
    """Fraction of verdicts that are ``entailment``; 1.0 for an empty list.

    An empty list is nothing to miss: DREAM-1K's AutoDQ scores it 1.0 on its side (4 of its
    clips have no ground-truth events), and so do we, for recall (no reference events) and for
    precision (a caption without events) alike (issue 14, item 8). Failing such a sample
    instead would drop it from the loss for a reason the policy cannot change.
    """
    if not verdicts:
        return 1.0
    return sum(v == "entailment" for v in verdicts) / len(verdicts)


def compute_step_score(coverage: float, delta1: float, delta2: float) -> float:
    """The paper's mapping: 0 if coverage < δ1, 0.5 if δ1 <= coverage < δ2, else 1."""
    if coverage < delta1 - _EPS:
        return 0.0
    if coverage < delta2 - _EPS:
        return 0.5
    return 1.0


def compute_escore(
    verdicts: Sequence[str],
    *,
    mode: str,
    delta1: float = 0.28,
    delta2: float = 0.35,
    precision_verdicts: Sequence[str] | None = None,
) -> tuple[float, dict[str, float]]:
    """Escore of one caption and its metrics.

    verdicts: one per ground-truth event (caption judged as premise).
    precision_verdicts: ``f1`` mode only; one per event extracted from the caption, judged
    against the reference caption. Returns (score in [0, 1], {"coverage", ["precision"]}).
    """
    for v in [*verdicts, *(precision_verdicts or [])]:
        if v not in VERDICTS:
            raise ValueError(f"unknown verdict {v!r}; expected one of {VERDICTS}")
    recall = compute_coverage(verdicts)
    metrics = {"coverage": recall}
    if mode == "step":
        return compute_step_score(recall, delta1, delta2), metrics
    if mode == "linear":
        return recall, metrics
    if mode == "f1":
        if precision_verdicts is None:
            raise ValueError("escore mode 'f1' needs precision_verdicts")
        precision = compute_coverage(precision_verdicts)
        metrics["precision"] = precision
        if precision + recall == 0:
            return 0.0, metrics
        return 2 * precision * recall / (precision + recall), metrics
    raise ValueError(f"escore_mode: expected 'step', 'linear' or 'f1', got {mode!r}")


def compute_cnscore(coverage: int, naturalness: int) -> float:
    """(coverage + naturalness) / 20 for two 0-10 ratings."""
    for name, value in (("coverage", coverage), ("naturalness", naturalness)):
        if not 0 <= value <= 10:
            raise ValueError(f"{name}: rating must be in [0, 10], got {value}")
    return (coverage + naturalness) / 20.0
