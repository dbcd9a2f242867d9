"""anomalib 2.7's F1 adaptive threshold in plain numpy, written from SPEC.md section 10.

``F1AdaptiveThreshold`` (non-binned) keeps every score and target; ``compute`` falls back
to the highest score when no target equals 1 and to the lowest when none equals 0, else
builds torchmetrics' binary precision-recall curve: scores sorted in descending order,
``tps`` the running count of targets equal to 1 at the last index of each distinct score, a
float32 tensor (``cumsum(target * 1.0)``: torch sums in float64 and rounds each sum),
``fps = 1 + index - tps`` in float32; ``precision = tps / (tps + fps)`` and
``recall = tps / tps[-1]`` in float32, both reversed and extended by 1 and 0;
``f1 = 2 p r / (p + r + 1e-10)`` in float32, NaN set to 0, and the threshold is the
distinct score at the first maximum.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def f1_curve(scores, labels):
    """``(thresholds ascending, f1)`` as anomalib computes them (both classes present)."""
    preds = np.asarray(scores).ravel()
    target = np.asarray(labels).ravel()
    order = np.argsort(preds, kind="stable")[::-1]
    preds, target = preds[order], target[order]
    distinct = np.flatnonzero(preds[1:] != preds[:-1])
    idx = np.append(distinct, preds.size - 1)
    # torchmetrics: tps = cumsum(target * 1.0), a float32 tensor (torch accumulates in
    # float64, then rounds each sum); fps = 1 + index - tps, int64 minus float32 in float32.
    tps = np.cumsum(target == 1, dtype=np.float64)[idx].astype(F32)
    fps = (1 + idx).astype(F32) - tps
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tps / (tps + fps)
        recall = tps / tps[-1]
        precision = np.append(precision[::-1], F32(1))
        recall = np.append(recall[::-1], F32(0))
        f1 = (F32(2) * precision * recall) / (precision + recall + F32(1e-10))
    f1 = np.where(np.isnan(f1), F32(0), f1).astype(F32)
    return preds[idx][::-1], f1


def f1_threshold(scores, labels):
    """anomalib 2.7's threshold, in the scores' dtype (numpy scalar)."""
    preds = np.asarray(scores).ravel()
    target = np.asarray(labels).ravel()
    if not np.any(target == 1):
        return preds.max()
    if not np.any(target == 0):
        return preds.min()
    thresholds, f1 = f1_curve(preds, target)
    return thresholds[int(np.argmax(f1))]
