"""Reference distributions saved with a model, for drift detection against live traffic.

Each column is summarised so that PSI (decile edges), KS (a sample) and chi-squared (binary
counts) can all be computed later without the training data. Every entry says what it is
(``kind``) and how many rows it came from, so a reader needs no knowledge of this module.

Values are summarised as the model sees them: NaN replaced by 0, as the scorer does; ``nan_rows``
keeps how many were NaN, since a rise in missing values is drift too.

>>> ref = distribution(np.array([0.0, 1.0, 1.0, 0.0]))
>>> ref["kind"], ref["counts"], ref["frequencies"]
('binary', {'0': 2, '1': 2}, {'0': 0.5, '1': 0.5})
>>> ref = distribution(np.arange(101, dtype=np.float32))
>>> ref["kind"], ref["quantiles"][:3], ref["rows"]
('numeric', [0.0, 10.0, 20.0], 101)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLE_SIZE = 5000
QUANTILES = np.linspace(0.0, 1.0, 11)  # 11 edges: the deciles, with min and max at the ends


def distribution(values: np.ndarray, sample_size: int = SAMPLE_SIZE) -> dict[str, Any]:
    """A JSON-able summary of one column: kind, quantiles or counts, a sample, mean, std, rows."""
    raw = np.asarray(values, dtype=np.float64)
    nan_rows = int(np.isnan(raw).sum())
    x = np.nan_to_num(raw, nan=0.0)
    out: dict[str, Any] = {"rows": len(x), "nan_rows": nan_rows}
    if len(x) == 0:
        return {"kind": "numeric", **out, "quantiles": [], "sample": [], "mean": None, "std": None}
    out |= {"mean": _num(x.mean()), "std": _num(x.std())}
    if np.isin(x, (0.0, 1.0)).all():
        ones = int((x == 1.0).sum())
        counts = {"0": len(x) - ones, "1": ones}
        return {
            "kind": "binary",
            **out,
            "counts": counts,
            "frequencies": {k: v / len(x) for k, v in counts.items()},
            "sample": _sample(x, sample_size),
        }
    return {
        "kind": "numeric",
        **out,
        "quantiles": [_num(q) for q in np.quantile(x, QUANTILES)],
        "sample": _sample(x, sample_size),
    }


def reference(
    features: np.ndarray, names: Sequence[str], scores: np.ndarray, *, split: str, **about: Any
) -> dict[str, Any]:
    """Distributions of every feature column of ``features`` (rows × names) and of the score."""
    if features.shape[1] != len(names):
        raise ValueError(f"{features.shape[1]} feature columns for {len(names)} names")
    return {
        "features": {name: distribution(features[:, j]) for j, name in enumerate(names)},
        "score": distribution(scores),
        "rows": int(features.shape[0]),
        "split": split,
        "nan": "replaced by 0 before summarising, as the scorer does; nan_rows counts them",
        "sample": f"up to {SAMPLE_SIZE} values evenly spaced over the rows in time order",
        **about,
    }


def _sample(x: np.ndarray, size: int) -> list[float]:
    # Evenly spaced rows of a time-ordered column: deterministic, and it covers the whole period
    # instead of a random clump.
    if len(x) > size:
        x = x[np.linspace(0, len(x) - 1, size).round().astype(np.int64)]
    return [_num(v) for v in x]


def _num(v: float) -> float:
    # 7 significant digits: float32 precision, and a third of the JSON of a full repr.
    return float(f"{float(v):.7g}")
