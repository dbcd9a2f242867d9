"""jaxnorm.f1_adaptive_threshold against a numpy reference of anomalib 2.7's metric.

The reference (tests/f1_reference.py) is written from SPEC.md section 10 in float32, as
torch computes it. Every case runs through each of the implementation's paths: the sort of
small inputs, the bins with one pass per group of candidate bins (several groups), and the
candidate bins' scores copied out and sorted (when they are few, or too many bins qualify).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxnorm
from jaxnorm._src import f1_curve
from tests import f1_reference as ref

PATHS = ["sort", "bins", "bins-1-bin-groups", "extract", "bins-then-extract"]


def take_path(name, monkeypatch):
    """Sizes and limits patched so that small inputs take the path ``name``."""
    if name != "sort":
        monkeypatch.setattr(f1_curve, "SORT_BELOW", 0)
    if name.startswith("bins"):  # group passes, however few scores the candidates hold
        monkeypatch.setattr(f1_curve, "EXTRACT_MAX", -1)
    if name == "bins-1-bin-groups":
        monkeypatch.setattr(f1_curve, "GROUP_BINS", 1)
    if name == "bins-then-extract":  # too many candidate bins: extracted whatever their size
        monkeypatch.setattr(f1_curve, "MAX_CANDIDATE_BINS", 0)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Which algorithm runs (see ``take_path``)."""
    take_path(request.param, monkeypatch)
    return request.param


def ours(scores, labels, **kw):
    return np.asarray(jaxnorm.f1_adaptive_threshold(scores, labels, **kw))


def assert_same(got, want):
    """Equal as float32, bit for bit (so -0.0/0.0 and subnormals count), same dtype."""
    assert got.dtype == np.asarray(want).dtype, (got.dtype, np.asarray(want).dtype)
    g, w = np.float32(got), np.float32(want)
    assert g.view(np.uint32) == w.view(np.uint32) or (g == 0 and w == 0), (got, want)


def f64_threshold(scores, labels):
    """anomalib's curve with F1 in float64: to show which sets float32 rounding decides."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    t = np.unique(s)
    tp = np.array([np.sum((s >= v) & (y == 1)) for v in t], np.float64)
    fp = np.array([np.sum((s >= v) & (y != 1)) for v in t], np.float64)
    p, r = tp / (tp + fp), tp / tp[0]
    return t[int(np.argmax(np.nan_to_num(2 * p * r / (p + r + 1e-10))))]


rng = np.random.default_rng(0)
_normal = rng.normal(size=300).astype(np.float32)
CASES = {
    "random": (_normal, _normal + rng.normal(size=300) > 1.5),
    "ties": (rng.integers(0, 6, 200).astype(np.float32), rng.integers(0, 2, 200)),
    "all-tied": (np.full(9, 2.5, np.float32), np.array([0, 1] * 4 + [1])),
    "two-values": (np.array([1.0, 2.0], np.float32), np.array([0, 1])),
    "negative": (-np.abs(_normal) - 3, _normal > 0.5),
    "huge": (_normal * np.float32(1e37), _normal > 0.8),
    "extremes": (
        np.array([3.4e38, -3.4e38, 1.0, -1.0, 0.0, 1e-30, -1e-30], np.float32),
        np.array([1, 0, 1, 0, 1, 0, 1]),
    ),
    "tiny": (_normal * np.float32(1e-35), _normal > 0.3),
    # Subnormals: XLA:CPU flushes them to zero in float arithmetic; torch keeps them apart.
    "subnormals": (
        np.array([1e-40, 0.0, -1e-40, 1e-45, -0.0, 3e-39, 1.0, -2e-45], np.float32),
        np.array([1, 0, 1, 1, 0, 0, 1, 0]),
    ),
    # float32 rounding decides between thresholds whose exact F1 is equal (found by search;
    # test_rounding_case_is_decided_by_float32 shows that float64 picks another one).
    "float32-rounding": (
        np.array([7, 10, 7, 6, 5, 0, 1, 8, 7, 6, 1, 9], np.float32),
        np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0]),
    ),
    "labels-0-1-2": (_normal, rng.integers(0, 3, 300)),
    "float-labels": (_normal, (_normal > 1).astype(np.float32)),
    "uint8-labels": (_normal, (_normal > 1).astype(np.uint8)),
    "maps-and-masks": (
        rng.normal(size=(3, 1, 6, 7)).astype(np.float32),
        rng.random((3, 6, 7)) < 0.2,
    ),
}
# One class: anomalib's fallbacks.
FALLBACKS = {
    "no-positive": (_normal, np.zeros(300, bool)),
    "no-zero": (_normal, np.ones(300, np.int64)),
    "0-255-mask": (_normal, np.where(_normal > 1, 255, 0).astype(np.uint8)),
    "labels-1-2": (_normal, np.where(_normal > 1, 1, 2)),
    "single-normal": (np.array([0.25], np.float32), np.array([False])),
    "single-anomalous": (np.array([0.25], np.float32), np.array([True])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_reference(name, path):
    scores, labels = CASES[name]
    assert_same(ours(scores, labels), ref.f1_threshold(scores, labels))


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_one_class_sets_fall_back_as_anomalib(name, path, caplog):
    scores, labels = FALLBACKS[name]
    with caplog.at_level("WARNING", logger="jaxnorm"):
        got = ours(scores, labels)
    assert_same(got, ref.f1_threshold(scores, labels))
    no_one = not np.any(np.asarray(labels) == 1)
    assert got == (scores.max() if no_one else scores.min())
    assert "no label equals " + ("1" if no_one else "0") in caplog.text


def test_rounding_case_is_decided_by_float32():
    scores, labels = CASES["float32-rounding"]
    assert f64_threshold(scores, labels) != ref.f1_threshold(scores, labels)
    assert_same(ours(scores, labels), ref.f1_threshold(scores, labels))


def test_f1_rounds_as_torchmetrics_beyond_2_to_the_24():
    """Counts past 2**24 lose digits in float32: torchmetrics holds tps as float32 and takes
    fps = (1 + index) - tps in float32, so precision is tps / (tps + fps), not tp / n."""
    r = np.random.default_rng(3)
    tp = r.integers(2**24, 2**31, 4000).astype(np.uint32)
    fp = r.integers(0, 2**30, 4000).astype(np.uint32)
    n_pos = np.uint32(2**31 + 12345)
    f32 = np.float32
    tps = tp.astype(f32)
    fps = (tp.astype(np.int64) + fp).astype(f32) - tps
    with np.errstate(invalid="ignore"):
        p, rc = tps / (tps + fps), tps / f32(n_pos)
        want = (f32(2) * p * rc) / (p + rc + f32(1e-10))
    got = np.asarray(jax.jit(f1_curve.f1_float32)(tp, fp, n_pos))
    np.testing.assert_array_equal(got, want)
    naive = (f32(2) * (tps / (tp.astype(np.int64) + fp).astype(f32)) * rc) / (
        (tps / (tp.astype(np.int64) + fp).astype(f32)) + rc + f32(1e-10)
    )
    assert np.any(naive != want), "the counts are too small to tell the two formulas apart"


def test_subnormals_are_kept_apart_from_zero(path):
    scores, labels = CASES["subnormals"]
    got = ours(scores, labels)
    assert got != 0 and abs(got) < np.finfo(np.float32).tiny  # a subnormal wins here
    assert_same(got, ref.f1_threshold(scores, labels))


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_scores_give_a_threshold_in_their_dtype(dtype, path):
    scores = (_normal * 3).astype(dtype)
    labels = _normal > 1
    got = ours(scores, labels)
    want = ref.f1_threshold(scores, labels)
    assert got.dtype == np.dtype(dtype) and got == want
    # float16 subnormals too
    sub = np.array([6e-8, 0.0, 1.2e-7, -6e-8, 1.0], np.float16)
    assert ours(sub, np.array([1, 0, 1, 0, 0])) == ref.f1_threshold(sub, np.array([1, 0, 1, 0, 0]))


def test_integer_scores_give_float32():
    scores = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    labels = scores > 3
    got = ours(scores, labels)
    assert got.dtype == np.float32 and got == ref.f1_threshold(scores, labels)


def test_mask_leaves_entries_out(path):
    scores, labels = CASES["random"]
    mask = rng.random(300) < 0.7
    poisoned = np.where(mask, scores, np.float32(1e30))  # masked entries would win
    assert_same(ours(poisoned, labels, mask=mask), ref.f1_threshold(scores[mask], labels[mask]))


def test_nonfinite_scores_raise_with_their_count_or_are_omitted(path):
    scores, labels = CASES["random"]
    bad = scores.copy()
    bad[[3, 50, 51]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="3 non-finite") as e:
        ours(bad, labels)
    assert e.value.count == 3
    keep = np.isfinite(bad)
    assert_same(ours(bad, labels, nonfinite="omit"), ref.f1_threshold(bad[keep], labels[keep]))


def test_bad_inputs_name_what_is_wrong():
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"labels have shape \(3,\).*scores have shape \(4,\)"):
        jaxnorm.f1_adaptive_threshold(x, np.zeros(3, bool))
    with pytest.raises(ValueError, match="no score to choose a threshold from"):
        jaxnorm.f1_adaptive_threshold(x, np.zeros(4, bool), mask=np.zeros(4, bool))
    with pytest.raises(ValueError, match="no score to choose"):
        jaxnorm.f1_adaptive_threshold(np.full(2, np.nan, np.float32), np.ones(2), nonfinite="omit")
    with pytest.raises(ValueError, match="nonfinite='drop'"):
        jaxnorm.f1_adaptive_threshold(x, np.zeros(4, bool), nonfinite="drop")
    with pytest.raises(ValueError, match="not a real number type"):
        jaxnorm.f1_adaptive_threshold(x.astype(complex), np.zeros(4, bool))
    with pytest.raises(ValueError, match="cannot run under jit"):
        jax.jit(jaxnorm.f1_adaptive_threshold)(x, np.zeros(4, bool))


def test_large_set_through_the_bins():
    """300k values with a realistic curve, past the size where the bins take over."""
    r = np.random.default_rng(5)
    labels = r.random(300_000) < 0.05
    scores = (r.normal(size=300_000) + 2.2 * labels).astype(np.float32)
    assert scores.size > f1_curve.SORT_BELOW
    assert_same(ours(scores, labels), ref.f1_threshold(scores, labels))
    # ties at scale: scores rounded to 1/64
    coarse = np.round(scores * 64) / 64
    assert_same(ours(coarse, labels), ref.f1_threshold(coarse, labels))


N = 48  # one shape for every example: hypothesis varies values, labels and mask, not sizes
_values = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
# Exactly float32 (hypothesis checks that elements survive the cast): ties, zeros of both
# signs, a subnormal and a huge value.
_small_values = st.sampled_from(
    [float(np.float32(v)) for v in (0.0, -0.0, 1.0, 1.5, -2.0, 1e-40, 3e38)]
)


@pytest.mark.parametrize("path_name", ["sort", "bins", "extract", "bins-then-extract"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    scores=hnp.arrays(np.float32, N, elements=st.one_of(_values, _small_values)),
    labels=hnp.arrays(np.int8, N, elements=st.sampled_from([0, 0, 0, 1, 1, 2])),
    mask=hnp.arrays(np.bool_, N),
)
def test_property_equals_reference(path_name, scores, labels, mask):
    with pytest.MonkeyPatch.context() as mp:
        take_path(path_name, mp)
        if not mask.any():
            with pytest.raises(ValueError, match="no score"):
                ours(scores, labels, mask=mask)
            return
        assert_same(ours(scores, labels, mask=mask), ref.f1_threshold(scores[mask], labels[mask]))
