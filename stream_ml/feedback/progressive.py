"""Rolling ranking metrics over the last N labelled predictions: cheap to add, computed on demand.

Progressive validation scores each example with the model as it was *before* learning it, so the
(label, score) pairs are honest out-of-sample predictions; a window of the latest ones says how a
model does *now*, which an all-time average hides after a concept change. Adding is a write into
a numpy ring buffer; the metrics (the trainer's own, from :mod:`stream_ml.training.metrics`) sort
the window, O(window log window), so they are computed only when exported.

>>> rolling = RollingMetrics(window=4, review_threshold=0.5)
>>> rolling.add_many([False, True, False, True, False], [0.9, 0.8, 0.1, 0.6, 0.3])
>>> m = rolling.metrics()  # the first pair fell out of the window
>>> m["roc_auc"], m["recall_at_review"], m["examples"], m["positives"]
(1.0, 1.0, 4, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream_ml.training import metrics as m


class RollingMetrics:
    """ROC AUC, PR AUC and recall at the review threshold of the last ``window`` (label, score) pairs.

    ``recall_at_review`` is the share of frauds scored at or above ``review_threshold``, the ones
    a person would have looked at. A metric whose class is absent from the window is NaN.
    """

    def __init__(self, window: int, review_threshold: float) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.window = int(window)
        self.review_threshold = float(review_threshold)
        self._y = np.zeros(self.window, dtype=bool)
        self._p = np.zeros(self.window, dtype=np.float64)
        self._next = 0  # where the next pair goes
        self._filled = 0
        self.total = 0  # pairs ever added

    def add(self, y: bool, p: float) -> None:
        """One label and the score the model gave before it knew it."""
        if p != p:  # NaN: the metrics could not rank it, and it means a broken model; say so here
            raise ValueError("score is NaN")
        self._y[self._next] = y
        self._p[self._next] = p
        self._next = (self._next + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        self.total += 1

    def add_many(self, y: Sequence[bool] | np.ndarray, p: Sequence[float] | np.ndarray) -> None:
        """Several pairs, oldest first."""
        y = np.asarray(y, dtype=bool)
        p = np.asarray(p, dtype=np.float64)
        if y.shape != p.shape or y.ndim != 1:
            raise ValueError(
                f"labels and scores must be 1-d and the same length, not {y.shape} and {p.shape}"
            )
        if np.isnan(p).any():
            raise ValueError("scores contain NaN")
        n = len(y)
        self.total += n
        if n >= self.window:  # only the last window of them stays
            y, p, n = y[-self.window :], p[-self.window :], self.window
        first = min(n, self.window - self._next)
        self._y[self._next : self._next + first], self._p[self._next : self._next + first] = (
            y[:first],
            p[:first],
        )
        self._y[: n - first], self._p[: n - first] = y[first:], p[first:]
        self._next = (self._next + n) % self.window
        self._filled = min(self._filled + n, self.window)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's labels and scores (copies; oldest first once the buffer has wrapped)."""
        if self._filled < self.window:
            return self._y[: self._filled].copy(), self._p[: self._filled].copy()
        return np.roll(self._y, -self._next), np.roll(self._p, -self._next)

    def metrics(self) -> dict[str, float | int]:
        y, p = self.pairs()
        positives = int(y.sum())
        return {
            "roc_auc": m.roc_auc(y, p),
            "pr_auc": m.pr_auc(y, p),
            "recall_at_review": float((p[y] >= self.review_threshold).mean()) if positives else float("nan"),
            "examples": len(y),
            "positives": positives,
        }
