"""jaxnorm.normalize against the numpy reference of SPEC section 1."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxnorm
from jaxnorm.testing import count_compiles
from tests import compat, reference, slow_producer

# Output tolerance: a few ulp of float32 math, plus the final rounding to the dtype.
ATOL = {np.float32: 1e-6, np.float16: 1e-3, ml_dtypes.bfloat16: 8e-3}


def ftz(x):
    """XLA flushes subnormal floats to zero, inputs and intermediate results alike.

    Values below 1e-30 become 0 here, so that the difference of two inputs is either 0 or a
    normal float32 (ulp(1e-30) > float32's smallest normal) and is never flushed either.
    """
    x = np.asarray(x)
    return np.where(np.abs(x) < 1e-30, np.zeros_like(x), x).astype(x.dtype)


@st.composite
def cases(draw, dtype):
    exponent = draw(st.integers(-6, 6 if dtype != np.float16 else 4))
    scale = 10.0**exponent
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, max_side=9))
    unit = draw(
        hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32), fill=st.nothing())
    )
    targets = (unit * np.float32(scale)).astype(dtype)
    a = np.float32(draw(st.floats(-2, 2, width=32)) * scale)
    b = np.float32(draw(st.floats(-2, 2, width=32)) * scale)
    lo, hi = min(a, b), max(a, b)
    # thresholds inside and outside of the range
    threshold = np.float32(draw(st.floats(-3, 3, width=32)) * scale)
    return ftz(targets), float(ftz(threshold)), float(ftz(lo)), float(ftz(hi))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=str)
@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_matches_reference(dtype, use_jit, data):
    targets, threshold, lo, hi = data.draw(cases(dtype))
    fn = jax.jit(jaxnorm.normalize) if use_jit else jaxnorm.normalize
    got = fn(jnp.asarray(targets), threshold, lo, hi)
    assert got.dtype == dtype
    assert got.shape == targets.shape
    want = reference.normalize(targets.astype(np.float64), threshold, lo, hi)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=str)
def test_degenerate_range_is_0_half_1_never_nan(dtype):
    x = np.array([-1e4, 1.9, 2.0, 2.1, 1e4], dtype)
    got = np.asarray(jaxnorm.normalize(x, 2.0, 2.0, 2.0), np.float64)
    np.testing.assert_array_equal(got, [0, 0, 0.5, 1, 1])
    # threshold away from the degenerate range: still 0 / 1 by side
    got = np.asarray(jaxnorm.normalize(x, 0.0, 5.0, 5.0), np.float64)
    np.testing.assert_array_equal(got, [0, 1, 1, 1, 1])


def test_threshold_maps_to_half_and_range_to_unit_width():
    x = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    got = np.asarray(jaxnorm.normalize(x, 1.0, 0.0, 2.0))
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.0])


def test_inputs_numpy_scalar_and_jax():
    assert jaxnorm.normalize(3, 2.0, 0.0, 4.0).shape == ()
    np.testing.assert_allclose(jaxnorm.normalize(3, 2.0, 0.0, 4.0), 0.75)
    np.testing.assert_allclose(jaxnorm.normalize(np.float32(3), 2, 0, 4), 0.75)
    np.testing.assert_allclose(
        jaxnorm.normalize(np.arange(3), np.float64(1), np.array(0.0), jnp.array(2.0)),
        [0.0, 0.5, 1.0],
    )


@pytest.mark.parametrize(
    "dtype, want",
    [
        (np.int32, np.float32),
        (np.uint8, np.float32),
        (np.float16, np.float16),
        (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
        (np.float32, np.float32),
    ],
    ids=str,
)
def test_dtype(dtype, want):
    assert jaxnorm.normalize(np.ones(4, dtype), 1.0, 0.0, 2.0).dtype == want


def test_float64_kept_under_x64():
    with compat.enable_x64(True):
        x = np.array([0.1, 0.2, 0.3])
        got = jaxnorm.normalize(x, 0.2, 0.1, 0.3)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, reference.normalize(x, 0.2, 0.1, 0.3), atol=1e-12)


def test_nan_targets_stay_nan_and_inf_clips():
    got = np.asarray(jaxnorm.normalize(np.array([np.nan, np.inf, -np.inf]), 0.0, -1.0, 1.0))
    assert np.isnan(got[0]) and got[1] == 1 and got[2] == 0


def test_no_recompile_for_new_scalars():
    x = jnp.linspace(-1, 1, 100)
    jaxnorm.normalize(x, 0.1, -1.0, 1.0)
    # Array statistics go into their own call as they are (values travel): compiled once.
    jaxnorm.normalize(x, 0.1, -1.0, jnp.array(1.0))
    with count_compiles() as log:
        for i in range(20):
            out = jaxnorm.normalize(x, 0.01 * i, -1.0 - i, 1.0 + 2 * i)
            out = jaxnorm.normalize(x, np.float32(0.01 * i), np.float64(-i), jnp.array(i + 1.0))
    assert log.count == 0, log.names
    # ...and the values really changed.
    np.testing.assert_allclose(out, reference.normalize(x, 0.19, -19, 20), atol=1e-6)


def test_one_fused_pass_over_the_array():
    x = jnp.ones((8, 1, 32, 32))
    hlo = jax.jit(jaxnorm.normalize).lower(x, 0.5, 0.0, 1.0).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    # instructions of the entry computation that produce a full-size array, besides the input
    ops = re.findall(r"^\s*(?:ROOT )?%\S+ = f32\[8,1,32,32\]\S* ([\w-]+)\(", entry, re.M)
    assert [op for op in ops if op != "parameter"] == ["fusion"], entry


@pytest.mark.parametrize(
    "args, match",
    [
        (("scores", 0.5, 0.0, 1.0), "targets: expected an array, got str"),
        ((np.array(["a"]), 0.5, 0.0, 1.0), "targets: dtype <U1"),
        ((np.array([True]), 0.5, 0.0, 1.0), "dtype bool"),
        ((np.array([1 + 1j]), 0.5, 0.0, 1.0), "complex"),
        ((np.ones(3), float("nan"), 0.0, 1.0), "threshold is nan"),
        ((np.ones(3), 0.5, np.inf, -np.inf), "min_val is inf.*run validation"),
        ((np.ones(3), 0.5, 2.0, 1.0), r"max_val \(1.0\) is smaller than min_val \(2.0\)"),
        ((np.ones(3), np.ones(2), 0.0, 1.0), r"threshold: expected a scalar, got shape \(2,\)"),
        (([1.0, 2.0], 0.5, 0.0, 1.0), "targets: expected an array, got list"),
    ],
)
def test_bad_input_raises_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        jaxnorm.normalize(*args)


# -- statistics as jax arrays: read once per array objects, never waited for ---------------


@pytest.fixture(scope="module")
def slow_stats():
    """``produce(seed, swap=False) -> (min, max)``: 0-d arrays from a jitted producer that
    runs for at least 0.3 s here (``swap`` returns them the wrong way round)."""

    def body(seed, swap, steps):
        m = jax.random.normal(jax.random.key(seed), (384, 384), jnp.float32) / 20
        m = jax.lax.fori_loop(0, steps, lambda i, m: jnp.tanh(m @ m + 0.1), m)
        lo, hi = m.min() - 1, m.max() + 1
        return jnp.where(swap, hi, lo), jnp.where(swap, lo, hi)

    produce = slow_producer.calibrated(body)
    return lambda seed, swap=False: produce(seed, swap)


def warm(x, slow_stats):
    """Compiles both calls for ``x``: the checked one (arrays still being computed), then the
    packed one, so that no compile runs while a timed producer does."""
    lo, hi = slow_stats(2)
    jax.block_until_ready(jaxnorm.normalize(x, 0.1, lo, hi))
    jax.block_until_ready(jaxnorm.normalize(x, 0.1, lo, hi))


def test_statistics_arrays_being_computed_are_not_waited_for(slow_stats):
    x = jnp.linspace(-1, 1, 64)
    warm(x, slow_stats)
    lo, hi = slow_stats(3)
    got = jaxnorm.normalize(x, 0.1, lo, hi)
    assert not lo.is_ready() and not hi.is_ready()  # the call read neither
    again = jaxnorm.normalize(x, 0.1, lo, hi)
    assert not lo.is_ready()
    want = reference.normalize(np.asarray(x), 0.1, float(lo), float(hi))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(again), want, atol=1e-6)


def test_negative_control_a_call_that_reads_the_statistics_waits(slow_stats):
    x = jnp.linspace(-1, 1, 64)
    lo, hi = slow_stats(4)
    jaxnorm.normalize(x, 0.1, float(lo), float(hi))  # what reading them means
    assert lo.is_ready()


def test_bad_statistics_being_computed_fail_the_result_with_the_checks_message(slow_stats):
    x = jnp.linspace(-1, 1, 64)
    warm(x, slow_stats)
    lo, hi = slow_stats(5, swap=True)
    got = jaxnorm.normalize(x, 0.1, lo, hi)
    assert not lo.is_ready()
    with pytest.raises(Exception, match=r"max_val \(.*\) is smaller than min_val") as info:
        np.asarray(got)
    assert not isinstance(info.value, AssertionError)
    # Once computed, the same arrays are checked on the host: the ValueError itself.
    with pytest.raises(ValueError, match=r"max_val \(.*\) is smaller than min_val"):
        jaxnorm.normalize(x, 0.1, lo, hi)
    # jax re-raises the last failed callback computation at exit; a good one replaces it.
    jax.block_until_ready(jaxnorm.normalize(x, 0.1, *slow_stats(6)))


def test_computed_statistics_arrays_are_read_once_per_objects(monkeypatch):
    from jaxnorm._src import validation

    reads = []
    real = validation.host_scalars
    monkeypatch.setattr(validation, "host_scalars", lambda *a: reads.append(1) or real(*a))
    x = jnp.linspace(-1, 1, 64)
    stats = jax.block_until_ready(jaxnorm.MinMax.empty().update(x * 3))
    with count_compiles() as log:
        for t in (0.1, 0.2, 0.1, 0.2, 0.1):
            out = jaxnorm.normalize(x, t, stats.min, stats.max)
    assert len(reads) == 2  # one per threshold value: the arrays' values are kept
    np.testing.assert_allclose(np.asarray(out), reference.normalize(np.asarray(x), 0.1, -3, 3))
    fresh = jax.block_until_ready(jaxnorm.MinMax.empty().update(x * 2))  # new arrays: read
    out = jaxnorm.normalize(x, 0.1, fresh.min, fresh.max)
    assert len(reads) == 3
    np.testing.assert_allclose(np.asarray(out), reference.normalize(np.asarray(x), 0.1, -2, 2))
    assert log.count <= 1, log.names  # at most the packed call's first compile
