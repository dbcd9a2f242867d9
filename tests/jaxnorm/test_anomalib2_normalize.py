"""anomalib 2.x's normalization (jaxnorm._src.anomalib2_normalize) against a numpy reference.

The reference is written from SPEC section 8, operation for operation in the dtypes torch
computes them in, so that float32, float16 and bfloat16 results must be bit-identical: the
threshold's midpoint and the range in the buffers' dtype (float16 or bfloat16 after
``module.half()``/``.to(torch.bfloat16)``), the rest in the scores' dtype. torch computes a
float16/bfloat16 operation in float32 and rounds its result to the half dtype, as numpy (and
ml_dtypes, for bfloat16) do; it rounds the threshold to the scores' dtype before the
subtraction, but divides by the range's value as it is.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from jaxnorm._src import anomalib2_normalize as v2
from jaxnorm.testing import count_compiles

NAN = math.nan


def buffers(values, dtype=np.float32):
    """Values as anomalib's buffers hold them: float32, then converted to ``dtype``."""
    return [np.asarray(np.float32(v)).astype(dtype)[()] for v in values]


def reference(x, threshold, lo, hi):
    """SPEC section 8: clamp((x - t) / (max - min) + 0.5, 0, 1), with anomalib 2's rules.

    ``threshold``, ``lo`` and ``hi`` are the buffers (numpy scalars of their dtype, or
    numbers: float32)."""
    x = np.asarray(x)
    stats = np.result_type(threshold, lo, hi) if isinstance(lo, np.generic) else np.dtype("f4")
    t, lo, hi = (np.asarray(v).astype(stats)[()] for v in (threshold, lo, hi))
    if math.isnan(lo) or math.isnan(hi):
        return x.astype(np.promote_types(x.dtype, np.float32))  # no statistics: unchanged
    with np.errstate(over="ignore"):
        if math.isnan(t):
            t = (hi + lo) / stats.type(2)  # a NaN threshold: the midpoint, in their dtype
        value_range = hi - lo  # in their dtype
    td = x.dtype.type(t)  # torch computes in the scores' dtype
    if value_range == 0:
        out = np.where(x > td, 1.0, np.where(x < td, 0.0, 0.5))
    else:
        with np.errstate(over="ignore"):  # float16 quotients beyond 65504 are inf, clamped
            quotient = ((x - td).astype(np.float32) / np.float32(value_range)).astype(x.dtype)
            out = np.clip(quotient + x.dtype.type(0.5), 0, 1)
    return out.astype(np.promote_types(x.dtype, np.float32))


def scores(dtype, n=4096, seed=0):
    x = np.random.default_rng(seed).normal(size=n) * 3
    x[:4] = [0.25, -1.0, 5.0, 40.0]  # at the threshold, at the statistics, beyond them
    return x.astype(dtype)


CASES = [
    (0.25, -1.0, 5.0),  # ordinary
    (NAN, -1.7, 2.3),  # NaN threshold: the midpoint
    (0.25, 0.25, 0.25),  # zero range, threshold inside it
    (0.25, -1.0, -1.0),  # zero range elsewhere
    (0.25, NAN, 5.0),  # no statistics: passthrough
    (0.25, -1.0, NAN),
    (NAN, NAN, NAN),  # anomalib's initial buffers
    (1e-3, -1e-7, 3e-7),  # a tiny range: most scores clamp
    (0.3, -1.1, 5.3),  # a range that float16 and bfloat16 cannot hold exactly
    (0.01, -0.003, 0.005),  # float16 subnormal differences (below 2**-14)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{v:g}" for v in c))
def test_bit_identical_to_the_reference(dtype, case):
    x = scores(dtype)
    got = np.asarray(v2.normalize_anomalib2(x, *(np.float32(v) for v in case)))
    want = reference(x, *case)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)


HALF = [np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("stats", HALF, ids=["float16 buffers", "bfloat16 buffers"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{v:g}" for v in c))
def test_half_precision_buffers_compute_the_midpoint_and_range_in_their_dtype(stats, dtype, case):
    """After module.half() / .to(torch.bfloat16) anomalib computes (min + max) / 2 and
    max - min in the buffers' dtype, rounded; computing them in float32 was off by up to
    7.8e-6 (float16) and 1e-3 (bfloat16)."""
    x = scores(dtype)
    held = buffers(case, stats)
    got = np.asarray(v2.normalize_anomalib2(x, *held))
    np.testing.assert_array_equal(got, reference(x, *held))


def test_half_precision_buffers_differ_from_float32_ones():
    """A negative control for the test above: its cases do tell the two apart."""
    x = scores(np.float32)
    case = (NAN, -1.7, 2.3)  # the range, 4.0009766 in float16, rounds to 4.0
    half = reference(x, *buffers(case, np.float16))
    as_float32 = reference(x, *(np.float32(v) for v in buffers(case, np.float16)))
    assert not np.array_equal(half, as_float32)


def test_the_spec_cases_by_value():
    x = np.array([-3.0, 0.0, 1.0, 2.0, 9.0], np.float32)
    # NaN threshold -> (0 + 4) / 2 = 2
    np.testing.assert_array_equal(
        v2.normalize_anomalib2(x, NAN, 0.0, 4.0), [0.0, 0.0, 0.25, 0.5, 1.0]
    )
    # zero range: 0 below, 0.5 at, 1 above the threshold
    np.testing.assert_array_equal(v2.normalize_anomalib2(x, 1.0, 1.0, 1.0), [0, 0, 0.5, 1, 1])
    # NaN statistics: the scores unchanged, not clamped
    np.testing.assert_array_equal(v2.normalize_anomalib2(x, 0.5, NAN, 1.0), x)
    # the ordinary formula, clamped
    np.testing.assert_array_equal(
        v2.normalize_anomalib2(x, 1.0, 0.0, 4.0), [0.0, 0.25, 0.5, 0.75, 1.0]
    )


def test_nonfinite_scores_follow_the_formula():
    x = np.array([NAN, math.inf, -math.inf], np.float32)
    got = np.asarray(v2.normalize_anomalib2(x, 0.0, -1.0, 1.0))
    assert math.isnan(got[0]) and got[1] == 1.0 and got[2] == 0.0


def test_new_statistics_do_not_recompile():
    x = scores(np.float32, n=64)
    v2.normalize_anomalib2(x, 0.5, 0.0, 1.0).block_until_ready()
    with count_compiles() as log:
        for case in CASES:
            v2.normalize_anomalib2(x, *case).block_until_ready()
    assert log.count == 0, log.names


def test_scalars_must_be_one_number():
    with pytest.raises(ValueError, match=r"min_val: expected one number, got shape \(2,\)"):
        v2.normalize_anomalib2(np.zeros(3), 0.5, np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="targets: expected an array, got str"):
        v2.normalize_anomalib2("scores", 0.5, 0.0, 1.0)


def packed(image, pixel):
    """anomalib's six buffers from ``(threshold, min, max)`` per statistic."""
    return np.array([image[0], pixel[0], image[1], image[2], pixel[1], pixel[2]], np.float32)


@pytest.mark.parametrize("sensitivity", [0.5, 0.3])
def test_postprocess_normalizes_and_labels_in_one_dispatch(sensitivity):
    score = scores(np.float32, n=32, seed=1)
    amap = scores(np.float32, n=32 * 8 * 8, seed=2).reshape(32, 8, 8)
    image, pixel = (0.3, -2.0, 6.0), (NAN, -4.0, 7.0)
    cut = np.float32(1.0) - np.float32(sensitivity)
    params, cuts = packed(image, pixel), np.array([cut, cut], np.float32)
    labels = (("pred_score", "pred_label"), ("anomaly_map", "pred_mask"))
    values = {"pred_score": score, "anomaly_map": amap}
    v2.postprocess(values, params, cuts, labels, matching=False)  # compiled once
    with count_compiles() as log:
        out = v2.postprocess(values, params + 1, cuts, labels, matching=False)
        out = v2.postprocess(values, params, cuts, labels, matching=False)
    assert log.count == 0, log.names
    want_score, want_map = reference(score, *image), reference(amap, *pixel)
    np.testing.assert_array_equal(out["pred_score"], want_score)
    np.testing.assert_array_equal(out["anomaly_map"], want_map)
    np.testing.assert_array_equal(out["pred_label"], want_score > cut)
    np.testing.assert_array_equal(out["pred_mask"], want_map > cut)
    assert out["pred_label"].dtype == np.bool_


def test_postprocess_takes_either_key_alone_and_names_unknown_ones():
    amap = np.ones((2, 4, 4), np.float32)
    params = packed((0.0, 0.0, 2.0), (0.5, 0.0, 2.0))
    cuts = np.float32([0.5, 0.5])
    out = v2.postprocess({"anomaly_map": amap}, params, cuts)
    assert sorted(out) == ["anomaly_map"]
    np.testing.assert_array_equal(out["anomaly_map"], reference(amap, 0.5, 0.0, 2.0))
    with pytest.raises(ValueError, match=r"unknown keys \['pred_scores'\]"):
        v2.postprocess({"pred_scores": amap}, params, cuts)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_scores_near_the_threshold_round_as_torch_does(dtype):
    """Differences from the threshold below float16's smallest normal (2**-14) are float16
    subnormals, which torch keeps and XLA's reduce_precision would flush."""
    x = (np.float32(0.01) + np.linspace(-2e-4, 2e-4, 801, dtype=np.float32)).astype(dtype)
    for case in [(0.01, 0.0098, 0.0102), (0.01, -1e-3, 1e-3), (NAN, 0.0099, 0.0101)]:
        got = np.asarray(v2.normalize_anomalib2(x, *(np.float32(v) for v in case)))
        np.testing.assert_array_equal(got, reference(x, *case), err_msg=str(case))


def test_postprocess_matches_a_nan_threshold_to_the_other_one_as_anomalib():
    amap = scores(np.float32, n=64).reshape(4, 4, 4)
    score = scores(np.float32, n=4, seed=3)
    params = packed((NAN, -2.0, 6.0), (0.4, -4.0, 7.0))
    cuts = np.float32([0.5, 0.5])
    values = {"pred_score": score, "anomaly_map": amap}
    matched = v2.postprocess(values, params, cuts)
    np.testing.assert_array_equal(matched["pred_score"], reference(score, 0.4, -2.0, 6.0))
    np.testing.assert_array_equal(matched["anomaly_map"], reference(amap, 0.4, -4.0, 7.0))
    unmatched = v2.postprocess(values, params, cuts, matching=False)
    np.testing.assert_array_equal(unmatched["pred_score"], reference(score, NAN, -2.0, 6.0))
