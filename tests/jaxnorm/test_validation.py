"""Issue 10: no silent wrong results. Bad statistics, wide integers, float32 extremes, options
and state round trips each get a clear error or the right answer."""

from __future__ import annotations

import json
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jaxnorm
from tests import compat, reference

F32_MAX = float(np.finfo(np.float32).max)


def validated(hook, *batches):
    hook.on_validation_epoch_start()
    for b in batches:
        hook.on_validation_batch_end(b)
    hook.on_validation_epoch_end()
    return hook


# -- 1. statistics from outside -----------------------------------------------------------


BAD_PAIRS = [
    ((math.nan, 1.0), r"'(stats\.)?image\.min' is nan"),
    ((0.0, math.inf), r"'(stats\.)?image\.max' is inf"),
    ((-math.inf, 1.0), r"'(stats\.)?image\.min' is -inf"),
    ((2.0, 1.0), r"'(stats\.)?image\.max' \(1.0\) is smaller than '(stats\.)?image\.min'"),
    ((0.0, 1e39), r"'(stats\.)?image\.max' is 1e\+39, beyond float32's range"),
]


@pytest.mark.parametrize("pair, match", BAD_PAIRS)
def test_set_stats_rejects_unusable_statistics_and_keeps_the_old(pair, match):
    hook = validated(jaxnorm.MinMaxNormalizationHook(), {"pred_scores": np.array([0.0, 1.0])})
    bad = jaxnorm.MinMax(min=np.float64(pair[0]), max=np.float64(pair[1]))
    with pytest.raises(ValueError, match="set_stats: " + match):
        hook.set_stats(jaxnorm.NormalizationStats(image=bad, pixel=jaxnorm.MinMax.empty()))
    assert hook.host_stats()["image"] == (0.0, 1.0)


def test_set_stats_rejects_stacked_statistics():
    stacked = jaxnorm.MinMax(min=jnp.zeros(2), max=jnp.ones(2))
    with pytest.raises(ValueError, match=r"'image.min' has shape \(2,\)"):
        jaxnorm.MinMaxNormalizationHook().set_stats(stacked)


@pytest.mark.parametrize("pair, match", BAD_PAIRS)
def test_load_state_dict_rejects_unusable_statistics(pair, match):
    state = jaxnorm.MinMaxNormalizationHook().state_dict()
    raw = flax.serialization.to_state_dict(state)
    raw["stats"]["image"] = {"min": np.float32(pair[0]), "max": np.float64(pair[1])}
    raw["image_threshold"] = np.float64(7.0)
    hook = validated(jaxnorm.MinMaxNormalizationHook(), {"pred_scores": np.array([0.0, 1.0])})
    with pytest.raises(ValueError, match="state: " + match):
        hook.load_state_dict(raw)
    # nothing changed
    assert hook.host_stats()["image"] == (0.0, 1.0) and hook.image_threshold == 0.5
    assert hook.num_values["image"] == 2


@pytest.mark.parametrize("lo, hi", [(math.nan, 1.0), (0.0, math.inf), (3.0, 1.0)])
def test_load_json_rejects_unusable_statistics(lo, hi):
    # Python's json writes and reads NaN and Infinity
    text = json.dumps({"image_threshold": 0.5, "pixel_threshold": 0.5, "min": lo, "max": hi})
    with pytest.raises(ValueError, match="metadata: '(min|max)'"):
        jaxnorm.MinMaxNormalizationHook.from_json(text)


def test_empty_pair_still_means_no_statistics():
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.set_stats(jaxnorm.MinMax.empty())
    with pytest.raises(jaxnorm.StatisticsMissingError):
        hook.on_test_start()
    hook.load_state_dict(jaxnorm.MinMaxNormalizationHook().state_dict())
    with pytest.raises(jaxnorm.StatisticsMissingError):
        hook.on_test_start()


@pytest.mark.parametrize("stats", ["shared", "separate"])
def test_all_scores_omitted_says_validation_ran_and_how_many_were_left_out(stats):
    hook = jaxnorm.MinMaxNormalizationHook(nonfinite="omit", stats=stats)
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end(
        {
            "pred_scores": np.full(4, np.nan, np.float32),
            "anomaly_maps": np.full((4, 1, 2, 2), np.inf, np.float32),
        }
    )
    hook.on_validation_epoch_end()
    # shared statistics come from the maps (16 values); separate ones name the image pair
    count = 16 if stats == "shared" else 4
    with pytest.raises(
        jaxnorm.StatisticsMissingError, match=f"validation ran, but all {count} of its scores"
    ):
        hook.on_test_start()
    fresh = jaxnorm.MinMaxNormalizationHook(nonfinite="omit", stats=stats)
    with pytest.raises(jaxnorm.StatisticsMissingError, match="run validation"):
        fresh.on_test_start()


def test_normalize_rejects_nonfinite_statistics_on_every_path():
    x = np.ones(3, np.float32)
    for lo, hi in ((jnp.float32(jnp.nan), jnp.float32(1)), (np.float32(0), np.float32(np.inf))):
        with pytest.raises(ValueError, match="(min|max)_val is (nan|inf)"):
            jaxnorm.normalize(x, 0.5, lo, hi)
        with pytest.raises(ValueError, match="(min|max)_val is (nan|inf)"):
            jaxnorm.normalize(x, 0.5, float(lo), float(hi))


# -- 2. integers wider than 32 bits ---------------------------------------------------------

WIDE = [2**31 + 5, -(2**40), 2**40 + 3]


@pytest.mark.parametrize(
    "values",
    [np.array(WIDE, np.int64), np.array([2**63 + 11, 2**33], np.uint64), WIDE[0]],
    ids=["int64", "uint64", "python-int"],
)
def test_wide_integers_do_not_wrap(values):
    want_lo, want_hi = reference.min_max(np.asarray(values, np.float64))
    stats = jaxnorm.MinMax.empty().update(values)
    assert (float(stats.min), float(stats.max)) == pytest.approx((want_lo, want_hi), rel=1e-7)
    got = np.asarray(jaxnorm.normalize(values, want_lo, want_lo, want_hi + 1))
    want = reference.normalize(np.asarray(values, np.float64), want_lo, want_lo, want_hi + 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    hook = validated(jaxnorm.MinMaxNormalizationHook(), {"pred_scores": np.atleast_1d(values)})
    assert hook.host_stats()["image"] == pytest.approx((want_lo, want_hi), rel=1e-7)


def test_wide_integer_box_scores_do_not_wrap():
    boxes = [np.array([2**40, 5], np.int64), np.array([-(2**33)], np.int64)]
    hook = validated(jaxnorm.MinMaxNormalizationHook(), {"box_scores": boxes})
    assert hook.host_stats()["pixel"] == (-(2.0**33), 2.0**40)


def test_python_int_beyond_int64_is_a_number():
    got = jaxnorm.normalize(2**70, 0.0, -1.0, 1.0)
    assert float(got) == 1.0


# -- 3. float32 extremes --------------------------------------------------------------------


def test_extreme_float32_statistics_give_the_right_scores():
    x = np.array([-F32_MAX, -1e38, 0.0, 1e38, F32_MAX], np.float32)
    got = np.asarray(jaxnorm.normalize(x, 0.0, -F32_MAX, F32_MAX), np.float64)
    want = reference.normalize(x, 0.0, -F32_MAX, F32_MAX)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.6 < got[3] < 0.7  # not 0.5, as 1 / (max - min) = 0 would give
    hook = jaxnorm.MinMaxNormalizationHook(0.0, 0.0)
    validated(hook, {"pred_scores": np.array([-F32_MAX, F32_MAX], np.float32)})
    np.testing.assert_allclose(
        np.asarray(hook.on_test_batch_end({"pred_scores": x})["pred_scores"]), want, atol=1e-6
    )


def test_statistics_beyond_float32_raise():
    with pytest.raises(ValueError, match="max_val is 1e.39, beyond float32's range"):
        jaxnorm.normalize(np.ones(2, np.float32), 0.0, 0.0, 1e39)
    with pytest.raises(ValueError, match="image_threshold is 1e.39, beyond float32's range"):
        jaxnorm.MinMaxNormalizationHook(image_threshold=1e39)
    with compat.enable_x64(True):  # float64 targets compute in float64: fine there
        got = jaxnorm.normalize(np.array([1e39, 3e39]), 2e39, 1e39, 3e39)
        np.testing.assert_allclose(got, [0.0, 1.0], atol=1e-12)


F32_TINY = float(np.finfo(np.float32).tiny)
finite32 = st.floats(-F32_MAX, F32_MAX, width=32, allow_subnormal=False)


@settings(max_examples=200, deadline=None)
@given(a=finite32, b=finite32, t=finite32, xs=st.lists(finite32, min_size=1, max_size=8))
# Equal statistics whose halves flush to signed zeros: the step must not flip.
@example(a=-F32_TINY, b=-F32_TINY, t=0.0, xs=[1.0, 0.0, -1.0])
@example(a=F32_TINY, b=F32_TINY, t=0.0, xs=[1.0, 0.0, -1.0])
def test_any_finite_inputs_give_scores_in_unit_interval(a, b, t, xs):
    lo, hi = min(a, b), max(a, b)
    got = np.asarray(jaxnorm.normalize(np.array(xs, np.float32), t, lo, hi))
    assert not np.isnan(got).any() and (got >= 0).all() and (got <= 1).all()
    want = reference.normalize(np.array(xs, np.float64), t, lo, hi)
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- 4. options ---------------------------------------------------------------------------


def test_options_are_validated():
    with pytest.raises(ValueError, match="reducer='none': expected 'auto', None or a callable"):
        jaxnorm.MinMaxNormalizationHook(reducer="none")
    hook = jaxnorm.MinMaxNormalizationHook()
    with pytest.raises(ValueError, match="reducer=3"):
        hook.reducer = 3
    with pytest.raises(ValueError, match="accumulate='false': expected True or False"):
        jaxnorm.MinMaxNormalizationHook(accumulate="false")
    for bad in ("0.5", None, [0.5], 1 + 2j, True):
        with pytest.raises(ValueError, match="image_threshold"):
            hook.image_threshold = bad
    with pytest.raises(TypeError, match="MinMax.merge: expected a MinMax, got float"):
        jaxnorm.MinMax.empty().merge(0.0)
    with pytest.raises(ValueError, match="not stacked.*axis name.*stack"):
        jaxnorm.MinMax.empty().reduce()


@pytest.mark.parametrize("text", ["[1, 2]", '"min"', "3.0"])
def test_json_that_is_not_an_object_says_what_to_pass(tmp_path, text):
    path = tmp_path / "meta.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="expected a JSON object.*to_json"):
        jaxnorm.MinMaxNormalizationHook.from_json(path)
    if text.startswith("["):
        with pytest.raises(ValueError, match="expected a JSON object"):
            jaxnorm.MinMaxNormalizationHook.from_json(text)


# -- 5. no unbounded growth ---------------------------------------------------------------


@pytest.mark.parametrize("nonfinite", ["raise", "omit"])
def test_state_does_not_grow_with_batches(nonfinite):
    hook = jaxnorm.MinMaxNormalizationHook(nonfinite=nonfinite, accumulate=True)
    batch = {"pred_scores": np.array([0.0, np.nan if nonfinite == "omit" else 1.0], np.float32)}
    hook.on_validation_epoch_start()
    for _ in range(10):
        hook.on_validation_batch_end(batch)
    jax.block_until_ready(hook.stats)
    before = len(jax.live_arrays())
    for _ in range(100):
        hook.on_validation_batch_end(batch)
    jax.block_until_ready(hook.stats)
    assert len(jax.live_arrays()) <= before
    hook.on_validation_epoch_end()


# -- 6. exact round trips -------------------------------------------------------------------


def test_state_dict_round_trip_is_exact_and_keeps_counts():
    hook = jaxnorm.MinMaxNormalizationHook(0.1, 1 / 3, nonfinite="omit", accumulate=True)
    batch = {"pred_scores": np.array([0.0, np.nan, 2.0], np.float32)}
    validated(hook, batch)
    data = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(hook.state_dict()))
    resumed = jaxnorm.MinMaxNormalizationHook(nonfinite="omit", accumulate=True)
    resumed.load_state_dict(flax.serialization.msgpack_restore(data))
    assert (resumed.image_threshold, resumed.pixel_threshold) == (0.1, 1 / 3)
    assert resumed.num_values == {"image": 3, "pixel": 3}
    assert resumed.num_nonfinite == {"image": 1, "pixel": 1}
    # a resumed run counts as an uninterrupted one
    validated(hook, batch)
    validated(resumed, batch)
    assert resumed.num_values == hook.num_values and resumed.num_nonfinite == hook.num_nonfinite


def test_counts_are_exact_beyond_2_to_the_32():
    hook = jaxnorm.MinMaxNormalizationHook(accumulate=True, nonfinite="omit")
    state = flax.serialization.to_state_dict(hook.state_dict())
    state["num_values"] = {"image": np.uint64(2**32 - 2), "pixel": np.uint64(2**40)}
    state["num_nonfinite"] = {"image": np.uint64(2**32 - 1), "pixel": np.uint64(0)}
    hook.load_state_dict(state)
    validated(hook, {"pred_scores": np.array([1.0, np.nan, 3.0, 4.0], np.float32)})
    assert hook.num_values == {"image": 2**32 + 2, "pixel": 2**40 + 4}
    assert hook.num_nonfinite == {"image": 2**32, "pixel": 1}
