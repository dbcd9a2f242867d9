"""jaxnorm's F1 adaptive threshold against anomalib 2.7.0's ``F1AdaptiveThreshold``.

Random and adversarial sets: ties, one class, 0/255 masks, half precision, subnormals,
exact-F1 ties that float32 rounding decides, and sets large enough to take the bins. The
threshold must be anomalib's bit for bit, in anomalib's dtype; streamed batch by batch
into ``jaxnorm.F1AdaptiveThreshold`` too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import F1AdaptiveThreshold as AnomalibMetric
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold

import jaxnorm

rng = np.random.default_rng(0)


def anomalib_threshold(batches) -> torch.Tensor:
    metric = _F1AdaptiveThreshold()
    for scores, labels in batches:
        metric.update(torch.as_tensor(scores), torch.as_tensor(labels))
    return metric.compute()


def as_torch_dtype(x):
    return torch.from_numpy(np.asarray(x).view(np.uint16)).view(torch.bfloat16)


def to_torch(scores):
    if scores.dtype == np.dtype("bfloat16"):
        return as_torch_dtype(scores)
    return torch.from_numpy(np.ascontiguousarray(scores))


def bits(x) -> int:
    if isinstance(x, torch.Tensor):
        x = x.float().numpy()
    return int(np.float32(np.asarray(x, np.float32)).view(np.uint32))


def same(ours, theirs: torch.Tensor):
    """Bit for bit, but for the sign of zero: when -0.0 and 0.0 are both scores they are one
    threshold, and which of the two anomalib returns depends on torch's (unstable) sort."""
    o = float(np.asarray(ours, np.float32))
    assert bits(ours) == bits(theirs) or (o == 0 and float(theirs) == 0), (o, theirs)


def labelled(n, rate=0.1, shift=2.0, dtype=np.float32, seed=None):
    r = np.random.default_rng(seed) if seed is not None else rng
    labels = r.random(n) < rate
    return (r.normal(size=n) + shift * labels).astype(dtype), labels


SETS = {
    "random-small": labelled(50),
    "random-mid": labelled(5000, rate=0.3, shift=0.7),
    "random-large": labelled(300_000, rate=0.05, shift=2.5),
    "ties": (rng.integers(0, 8, 4000).astype(np.float32), rng.integers(0, 2, 4000)),
    "ties-large": (np.round(labelled(200_000)[0] * 16) / 16, labelled(200_000)[1]),
    "all-equal": (np.full(100, 0.5, np.float32), np.arange(100) % 3 == 0),
    "single": (np.array([0.3], np.float32), np.array([1])),
    "no-anomaly": (labelled(1000)[0], np.zeros(1000, np.int64)),
    "no-normal": (labelled(1000)[0], np.ones(1000, np.int64)),
    "mask-0-255": (labelled(1000)[0], np.where(rng.random(1000) < 0.2, 255, 0).astype(np.uint8)),
    "labels-0-1-2": (labelled(1000)[0], rng.integers(0, 3, 1000)),
    "negative": (-np.abs(labelled(2000)[0]) - 100, labelled(2000)[1]),
    "huge": (labelled(2000)[0] * np.float32(1e36), labelled(2000)[1]),
    "tiny": (labelled(2000)[0] * np.float32(1e-36), labelled(2000)[1]),
    "subnormals": (
        np.array([1e-40, 0.0, -1e-40, 1e-45, -0.0, 3e-39, 1.0, -2e-45, 2e-40], np.float32),
        np.array([1, 0, 1, 1, 0, 0, 1, 0, 1]),
    ),
    "subnormals-large": (
        (labelled(100_000)[0] * np.float32(1e-39)).astype(np.float32),
        labelled(100_000)[1],
    ),
    "float32-rounding": (
        np.array([7, 10, 7, 6, 5, 0, 1, 8, 7, 6, 1, 9], np.float32),
        np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0]),
    ),
    "float16": labelled(50_000, dtype=np.float16),
    "float16-subnormal": (
        np.array([6e-8, 0.0, 1.2e-7, -6e-8, 1.0, 3e-5], np.float16),
        np.array([1, 0, 1, 0, 0, 1]),
    ),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_one_set_equals_anomalib(name):
    scores, labels = SETS[name]
    theirs = anomalib_threshold([(to_torch(scores), labels)])
    ours = jaxnorm.f1_adaptive_threshold(scores, labels)
    same(ours, theirs)
    assert np.dtype(ours.dtype).itemsize == theirs.element_size()


def test_bfloat16_scores_equal_anomalib():
    import ml_dtypes

    scores, labels = labelled(20_000)
    bf = scores.astype(ml_dtypes.bfloat16)
    theirs = anomalib_threshold([(as_torch_dtype(bf), labels)])
    assert theirs.dtype == torch.bfloat16
    same(jaxnorm.f1_adaptive_threshold(bf, labels), theirs)


@pytest.mark.parametrize("seed", range(40))
def test_random_sets_equal_anomalib(seed):
    r = np.random.default_rng(1000 + seed)
    n = int(r.choice([3, 17, 200, 3000, 40_000]))
    scale = float(10.0 ** r.integers(-3, 4))
    labels = r.random(n) < r.uniform(0.02, 0.6)
    scores = (r.normal(size=n) + r.uniform(0, 3) * labels) * scale
    if seed % 3 == 0:
        scores = np.round(scores, 1)  # ties
    scores = scores.astype(np.float32)
    same(jaxnorm.f1_adaptive_threshold(scores, labels), anomalib_threshold([(scores, labels)]))


def test_more_values_than_float32_counts_exactly():
    """2**24 + 2**20 values: torchmetrics' float32 counts round, and jaxnorm's F1 curve must
    round the same way, value for value (not only at the maximum)."""
    from torchmetrics.functional.classification.precision_recall_curve import (
        _binary_precision_recall_curve_compute,
    )

    from jaxnorm._src import f1_curve

    r = np.random.default_rng(11)
    n = 2**24 + 2**20
    labels = r.random(n) < 0.5
    scores = (r.integers(0, 40, n) + 3 * labels).astype(np.float32)  # 43 distinct values
    p, rc, t = _binary_precision_recall_curve_compute(
        (torch.from_numpy(scores), torch.from_numpy(labels)), None
    )
    theirs = ((2 * p * rc) / (p + rc + 1e-10))[:-1].numpy()
    # tp and fp at each distinct score, ascending, as the curve's thresholds are
    values = np.unique(scores)
    np.testing.assert_array_equal(values, t.numpy())
    at = np.searchsorted(values, scores)
    tp = np.cumsum(np.bincount(at, weights=labels, minlength=values.size)[::-1])[::-1]
    total = np.cumsum(np.bincount(at, minlength=values.size)[::-1])[::-1]
    ours = f1_curve.f1_float32(
        tp.astype(np.uint32), (total - tp).astype(np.uint32), np.uint32(labels.sum())
    )
    np.testing.assert_array_equal(np.asarray(ours), theirs)
    same(jaxnorm.f1_adaptive_threshold(scores, labels), anomalib_threshold([(scores, labels)]))


@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_streamed_batches_equal_anomalib(mode):
    """4 batches of anomaly maps with masks, folded one by one as the PostProcessor does."""
    r = np.random.default_rng(7)
    batches = []
    for _ in range(4):
        masks = np.zeros((8, 1, 64, 64), bool)
        for i in range(0, 8, 2):
            y, x = r.integers(0, 48, 2)
            masks[i, 0, y : y + 12, x : x + 10] = True
        batches.append(((r.normal(size=masks.shape) + 2.0 * masks).astype(np.float32), masks))
    theirs = anomalib_threshold(batches)
    state = jaxnorm.F1AdaptiveThreshold.empty(mode)
    for maps, masks in batches:
        state = state.update(maps, masks)
    result = state.compute_with_bound()
    assert float(result.max_f1_lost) == 0
    same(result.threshold, theirs)


def test_the_batch_metric_anomalib_2_uses_takes_the_same_values():
    """``F1AdaptiveThreshold(fields=...)`` (what PostProcessor holds) reads ImageBatch fields:
    the threshold is the one of their values."""
    scores, labels = labelled(64, rate=0.3, seed=3)
    metric = AnomalibMetric(fields=["pred_score", "gt_label"], strict=False)
    metric.update(
        ImageBatch(
            image=torch.zeros(64, 3, 4, 4),
            pred_score=torch.from_numpy(scores),
            gt_label=torch.from_numpy(labels),
        )
    )
    same(jaxnorm.f1_adaptive_threshold(scores, labels), metric.compute())
