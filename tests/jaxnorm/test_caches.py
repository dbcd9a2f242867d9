"""The core's caches never outlive the values they stand for (issue 20, classes 6 to 9).

``MinMax.empty()`` used to hand out one cached pair of arrays, and ``jaxnorm.normalize``
kept statistics arrays' checked values by identity. Each test here failed on the code
before the fix; values are checked against the numpy reference.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from tests import reference, slow_producer

# -- class 6: every empty state owns its arrays ------------------------------------------------


def _donating_step():
    return jax.jit(lambda state, x: state.update(x), donate_argnums=0)


def test_donating_an_empty_state_deletes_no_other_state():
    # The usual nnx/flax eval step donates its state; MinMax.empty() handed out one shared
    # pair, so the donation deleted it for every later empty state, hook and metric.
    x = jnp.arange(4.0)
    donated = jaxnorm.MinMax.empty()
    _donating_step()(donated, x)
    assert donated.min.is_deleted()  # the donation took place on this backend
    fresh = jaxnorm.MinMax.empty()
    assert (float(fresh.min), float(fresh.max)) == (np.inf, -np.inf)
    assert np.asarray(fresh.update(x * 2).max) == 6.0
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"pred_scores": x})
    hook.on_validation_epoch_end()
    assert hook.host_stats()["image"] == (0.0, 3.0)
    metric = jaxnorm.nnx.MinMaxMetric(argname="scores")
    metric.update(scores=x)
    metric.reset()
    metric.update(scores=x + 1)
    assert (float(metric.compute().min), float(metric.compute().max)) == (1.0, 4.0)


def test_donating_one_empty_state_leaves_a_later_donation_working():
    step = _donating_step()
    x = jnp.arange(3.0)
    for i in range(3):  # each loop's state is fresh: every donation is of arrays it owns
        out = step(jaxnorm.MinMax.empty(), x + i)
        assert (float(out.min), float(out.max)) == (i, i + 2)


def test_image_and_pixel_empty_statistics_are_distinct_arrays_that_donate_together():
    # A NormalizationStats.empty() held one pair twice: donating it donated a buffer twice.
    stats = jaxnorm.NormalizationStats.empty()
    step = jax.jit(lambda s, x: jaxnorm.update_stats(s, {"pred_scores": x}), donate_argnums=0)
    out = step(stats, jnp.arange(3.0))
    assert (float(out.image.min), float(out.image.max)) == (0.0, 2.0)


# -- class 7: a deleted statistic raises jax's error --------------------------------------------


def test_a_deleted_statistic_raises_jax_error_and_does_not_crash_the_interpreter():
    # is_ready() on a deleted array killed the interpreter: run it where a crash is seen.
    code = textwrap.dedent(
        """
        import os
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax.numpy as jnp, jaxnorm
        lo = jnp.float32(0)
        lo.delete()
        try:
            jaxnorm.normalize(jnp.ones(3), 1.0, lo, jnp.float32(4))
        except RuntimeError as e:
            print("raised:", e)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "raised: Array has been deleted" in done.stdout, done.stdout


@pytest.mark.parametrize("which", ["threshold", "min_val", "max_val"])
def test_a_statistic_deleted_after_it_was_checked_raises_jax_error(which):
    # After a first call the arrays' checks are kept: a later call must still see the
    # deletion, not compute with the values read before.
    x = jnp.linspace(-1, 1, 8)
    scalars = {"threshold": jnp.float32(0.1), "min_val": jnp.float32(-1), "max_val": jnp.float32(2)}
    jax.block_until_ready(jaxnorm.normalize(x, *scalars.values()))
    scalars[which].delete()
    with pytest.raises(RuntimeError, match="deleted"):
        jaxnorm.normalize(x, *scalars.values())


def test_donated_statistics_raise_jax_error():
    x = jnp.linspace(-1, 1, 8)
    stats = jax.block_until_ready(jaxnorm.MinMax.empty().update(x))
    jax.block_until_ready(jaxnorm.normalize(x, 0.0, stats.min, stats.max))
    _donating_step()(stats, x)
    with pytest.raises(RuntimeError, match="deleted"):
        jaxnorm.normalize(x, 0.0, stats.min, stats.max)


# -- class 8: statistics on another device work whether computed yet or not -----------------


@pytest.fixture(scope="module")
def slow_stats():
    """``produce(seed) -> (min, max)`` 0-d arrays of a producer that runs >= 0.3 s here."""

    def body(seed, flag, steps):
        del flag
        m = jax.random.normal(jax.random.key(seed), (384, 384), jnp.float32) / 20
        m = jax.lax.fori_loop(0, steps, lambda i, m: jnp.tanh(m @ m + 0.1), m)
        return m.min() - 1, m.max() + 1

    return slow_producer.calibrated(body)


def _placements(devices):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    return {
        "device 0": jax.sharding.SingleDeviceSharding(devices[0]),
        "sharded": NamedSharding(mesh, P("data")),
    }


@pytest.mark.parametrize("where", ["device 0", "sharded"])
def test_statistics_on_another_device_give_the_same_result_ready_or_in_flight(
    devices, slow_stats, where
):
    sharding = _placements(devices)[where]
    x = jax.device_put(jnp.linspace(-1, 1, 64).reshape(8, 8), sharding)
    other = devices[1] if where == "device 0" else devices[0]
    lo, hi = slow_stats(7)
    # Warm both calls (compiles) with ready arrays of the same placement.
    warm = jax.block_until_ready(jax.device_put(slow_stats(8), other))
    jax.block_until_ready(jaxnorm.normalize(x, 0.1, *warm))
    jax.block_until_ready(jaxnorm.normalize(x, 0.1, *jax.device_put((lo, hi), other)))
    lo, hi = jax.device_put(slow_stats(9), other)  # in flight, committed to `other`
    in_flight = jaxnorm.normalize(x, 0.1, lo, hi)
    assert not lo.is_ready()  # the call did not wait for them
    jax.block_until_ready((lo, hi))
    ready = jaxnorm.normalize(x, 0.1, lo, hi)
    want = reference.normalize(np.asarray(x), 0.1, float(lo), float(hi))
    for got in (in_flight, ready):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
        assert got.sharding.is_equivalent_to(x.sharding, x.ndim)


def test_statistics_on_another_device_with_an_array_threshold(devices):
    x = jax.device_put(jnp.linspace(-1, 1, 16), devices[0])
    t, lo, hi = jax.device_put((jnp.float32(0.2), jnp.float32(-2), jnp.float32(3)), devices[2])
    got = jaxnorm.normalize(x, t, lo, hi)
    np.testing.assert_allclose(np.asarray(got), reference.normalize(np.asarray(x), 0.2, -2, 3))
    assert got.devices() == {devices[0]}


@pytest.mark.parametrize("targets_on", ["numpy", "uncommitted", "device 3"])
def test_scalars_committed_to_different_devices_meet_somewhere(devices, targets_on):
    # Found by tests/jaxnorm/test_stateful.py: a threshold committed to one device (a DLPack
    # import) and statistics to another, beside targets that are not committed.
    raw = np.linspace(-1, 1, 16, dtype=np.float32)
    x = {
        "numpy": raw,
        "uncommitted": jnp.asarray(raw),
        "device 3": jax.device_put(raw, devices[3]),
    }[targets_on]
    t = jax.device_put(jnp.float32(0.2), devices[0])
    lo, hi = jax.device_put((jnp.float32(-2), jnp.float32(3)), devices[1])
    got = jaxnorm.normalize(x, t, lo, hi)
    np.testing.assert_allclose(np.asarray(got), reference.normalize(raw, 0.2, -2, 3), atol=1e-6)
    if targets_on == "device 3":
        assert got.devices() == {devices[3]}


# -- class 9: float thresholds and array identities are different keys ------------------------


def test_a_float_threshold_equal_to_an_arrays_id_is_not_that_array():
    x = jnp.linspace(-1, 1, 8)
    t, lo, hi = jnp.float32(0.1), jnp.float32(-1), jnp.float32(1)
    np.testing.assert_allclose(
        np.asarray(jaxnorm.normalize(x, t, lo, hi)),
        reference.normalize(np.asarray(x), 0.1, -1, 1),
        atol=1e-6,
    )
    impostor = float(id(t))
    got = jaxnorm.normalize(x, impostor, lo, hi)
    np.testing.assert_allclose(
        np.asarray(got), reference.normalize(np.asarray(x), impostor, -1, 1), atol=1e-6
    )


def test_an_array_threshold_whose_id_equals_an_earlier_float_is_that_array():
    x = jnp.linspace(-1, 1, 8)
    t, lo, hi = jnp.float32(0.1), jnp.float32(-1), jnp.float32(1)
    jax.block_until_ready(jaxnorm.normalize(x, float(id(t)), lo, hi))
    np.testing.assert_allclose(
        np.asarray(jaxnorm.normalize(x, t, lo, hi)),
        reference.normalize(np.asarray(x), 0.1, -1, 1),
        atol=1e-6,
    )


# -- the values travel: nothing computes with a value read earlier --------------------------


def test_statistics_written_through_a_dlpack_alias_are_the_ones_used():
    # jax calls writing a DLPack-shared buffer undefined behaviour for the jax array; the
    # statistics still go into each call as they are, so the result uses the new value.
    torch = pytest.importorskip("torch")
    lo_t, hi_t = torch.tensor(0.0), torch.tensor(4.0)
    lo, hi = jax.dlpack.from_dlpack(lo_t), jax.dlpack.from_dlpack(hi_t)
    x = jnp.arange(4.0)
    np.testing.assert_allclose(
        np.asarray(jaxnorm.normalize(x, 1.0, lo, hi)), reference.normalize(np.arange(4.0), 1, 0, 4)
    )
    hi_t.fill_(8.0)
    np.testing.assert_allclose(
        np.asarray(jaxnorm.normalize(x, 1.0, lo, hi)), reference.normalize(np.arange(4.0), 1, 0, 8)
    )


# -- numpy inputs: the caller's buffer may be written as soon as a call returns ---------------


def _aligned(values: np.ndarray) -> np.ndarray:
    """``values`` in a 64-byte aligned buffer: what jax's CPU client reads in place."""
    buf = np.empty(values.size + 16, values.dtype)
    start = (-buf.ctypes.data % 64) // values.itemsize
    out = buf[start : start + values.size].reshape(values.shape)
    out[...] = values
    assert out.ctypes.data % 64 == 0
    return out


def test_a_numpy_input_written_after_normalize_returns_does_not_change_the_result(slow_stats):
    # Found by tests/jaxnorm/test_stateful.py: jax read an aligned numpy array in place when
    # the computation ran, after the call had returned and the caller had reused the buffer.
    raw = np.linspace(-1, 1, 64, dtype=np.float32)
    jax.block_until_ready(jaxnorm.normalize(_aligned(raw), 0.1, *slow_stats(10)))  # compiles
    lo, hi = slow_stats(11)
    x = _aligned(raw)
    got = jaxnorm.normalize(x, 0.1, lo, hi)
    assert not lo.is_ready()  # the computation waits for them: x is read later
    x[...] = 1e6
    want = reference.normalize(raw, 0.1, float(lo), float(hi))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_a_numpy_batch_written_after_the_hook_returns_is_folded_as_it_was(slow_stats):
    hook = jaxnorm.MinMaxNormalizationHook()
    raw = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 1, 4, 4)
    for seed in (12, 13):  # the second round runs compiled
        hook.on_validation_epoch_start()
        first = jnp.stack(slow_stats(seed)).reshape(2, 1, 1, 1) * jnp.ones((2, 1, 4, 4))
        hook.on_validation_batch_end({"anomaly_maps": first})  # still being computed
        x = _aligned(raw)
        hook.on_validation_batch_end({"anomaly_maps": x})  # folded after the first
        x[...] = 1e6
        hook.on_validation_epoch_end()
        lo, hi = hook.host_stats()["pixel"]
        assert hi == max(1.0, float(first.max())), (lo, hi)
