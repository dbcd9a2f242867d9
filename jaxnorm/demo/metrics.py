"""Detection metrics in numpy: AUROC and F1 (the F1-optimal threshold is jaxnorm's own).

Written out here instead of importing scikit-learn, so the demo needs nothing beyond
jaxnorm's own dependencies. The conventions are anomalib's: a sample is predicted
anomalous when its score is ``>=`` the threshold.
"""

from __future__ import annotations

import numpy as np


def _flat(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} values but labels has {y.size}.")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as half.

    Args:
      scores: anomaly scores of any shape; higher means more anomalous.
      labels: same size, truthy for anomalous.

    Returns:
      The probability that a random anomalous sample scores above a random normal one,
      counting ties as 1/2; NaN when one class is absent.
    """
    s, y = _flat(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    # Tied values share the mean of the 1-based ranks they span.
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def f1_score(predicted, labels) -> float:
    """F1 of boolean predictions against labels (1.0 when both are all negative)."""
    p, y = _flat(predicted, labels)
    p = p.astype(bool)
    tp = int(np.sum(p & y))
    denom = int(np.sum(p)) + int(np.sum(y))
    return 1.0 if denom == 0 else 2 * tp / denom
