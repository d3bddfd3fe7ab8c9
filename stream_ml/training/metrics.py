"""Ranking metrics for a rare positive class, in numpy (no sklearn in the dependencies).

Fraud is under 1 % of payments, so ROC AUC alone flatters a model: PR AUC, recall at a low false
positive rate and precision among each day's top-k (what a review team with a daily capacity
sees) say more. Tied scores are handled as one threshold everywhere: a model cannot order them.

>>> y = [0, 0, 1, 1]
>>> p = [0.1, 0.4, 0.35, 0.8]
>>> roc_auc(y, p)
0.75
>>> round(pr_auc(y, p), 4)
0.8333
>>> recall_at_fpr(y, p, fpr=0.0)
0.5
>>> precision_at_top_k_per_day(y, p, [0, 0, 86_400_000, 86_400_000], k=1)
0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DAY_MS = 86_400_000
ArrayLike = np.ndarray | Sequence[float]


def roc_auc(y: ArrayLike, p: ArrayLike) -> float:
    """Probability that a random positive scores above a random negative (ties count half).

    NaN when either class is absent: the number is not defined then.
    """
    y, p = _check(y, p)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y: ArrayLike, p: ArrayLike) -> float:
    """Average precision: the mean of the precision at each positive's threshold.

    Computed as Σ (R_k − R_{k−1}) · P_k over the distinct thresholds, the step-wise area that does
    not interpolate (interpolation is optimistic for rare classes). NaN without positives.
    """
    tp, fp, _ = _curve(*_check(y, p))
    if len(tp) == 0 or tp[-1] == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall_step = np.diff(tp, prepend=0.0) / tp[-1]
    return float((recall_step * precision).sum())


def recall_at_fpr(y: ArrayLike, p: ArrayLike, fpr: float = 0.01) -> float:
    """The largest share of positives caught by a threshold that flags at most ``fpr`` of negatives."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be between 0 and 1, not {fpr}")
    tp, fp, _ = _curve(*_check(y, p))
    if len(tp) == 0 or tp[-1] == 0:
        return float("nan")
    n_neg = fp[-1]
    allowed = fp <= fpr * n_neg if n_neg else np.ones_like(fp, dtype=bool)
    # Flagging nothing (recall 0) is always allowed; thresholds only add positives as they go down.
    return float(tp[allowed].max() / tp[-1]) if allowed.any() else 0.0


def precision_at_top_k_per_day(y: ArrayLike, p: ArrayLike, event_time_ms: ArrayLike, k: int = 20) -> float:
    """Mean over UTC days of the share of frauds among that day's ``k`` highest scores.

    A day with fewer than ``k`` rows counts all of them. Ties at the k-th score are cut in input
    order (stable), so the number is deterministic. NaN when there are no rows.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    y, p = _check(y, p)
    days = np.asarray(event_time_ms, dtype=np.int64) // DAY_MS
    if len(days) != len(y):
        raise ValueError(f"event_time_ms has {len(days)} values for {len(y)} labels")
    if len(y) == 0:
        return float("nan")
    # One sort by (day, −score), stable: each day's rows end up together, best first.
    order = np.lexsort((-p, days))
    days_sorted = days[order]
    starts = np.flatnonzero(np.r_[True, days_sorted[1:] != days_sorted[:-1]])
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    top = position < k
    group = np.searchsorted(starts, np.flatnonzero(top), side="right") - 1
    hits = np.bincount(group, weights=y[order][top], minlength=len(starts))
    counts = np.minimum(np.diff(np.r_[starts, len(order)]), k)
    return float((hits / counts).mean())


def _check(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-d and the same length, not {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (drop unknown labels, -1, first)")
    if np.isnan(p).any():
        raise ValueError("scores contain NaN")
    return y.astype(bool), p


def _curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, from the highest score down."""
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    last_of_tie = np.r_[p_sorted[1:] != p_sorted[:-1], True] if len(p) else np.zeros(0, dtype=bool)
    tp = np.cumsum(y_sorted, dtype=np.float64)[last_of_tie]
    fp = np.cumsum(~y_sorted, dtype=np.float64)[last_of_tie]
    return tp, fp, p_sorted[last_of_tie]


def _average_ranks(p: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(p, kind="stable")
    p_sorted = p[order]
    first = np.r_[True, p_sorted[1:] != p_sorted[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(p)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(p), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks
