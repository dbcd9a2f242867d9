"""jaxnorm.nnx.MinMaxMetric: an nnx.Metric view of MinMax, eager, in nnx.jit, in MultiMetric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm.nnx import MinMaxMetric
from jaxnorm.testing import count_compiles
from tests import compat, reference


def batches(n=5, seed=0, shape=(4, 1, 8, 8)):
    """Validation maps with extremes in different batches and a few non-finite values."""
    rng = np.random.default_rng(seed)
    out = [rng.normal(size=shape).astype(np.float32) for _ in range(n)]
    out[1][0, 0, 2, 3] = 9.5
    out[3][2, 0, 7, 1] = -8.25
    out[2][1, 0, 0, 0] = np.nan
    out[4][3, 0, 5, 5] = np.inf
    out[4][0, 0, 1, 5] = -np.inf
    return out


def finite_reference(values, mask=None):
    """min and max over the finite entries of ``values`` where ``mask`` is true."""
    v = np.concatenate([np.ravel(b) for b in values])
    keep = np.isfinite(v)
    if mask is not None:
        parts = [np.broadcast_to(m, b.shape).ravel() for m, b in zip(mask, values, strict=True)]
        keep &= np.concatenate(parts)
    return reference.min_max(v[keep])


def as_tuple(stats):
    assert isinstance(stats, jaxnorm.MinMax)
    return float(stats.min), float(stats.max)


@nnx.jit
def jit_update(metric, values):
    metric.update(anomaly_maps=values)


def update_eager(metric, values):
    metric.update(anomaly_maps=values)


@pytest.mark.parametrize("update", [update_eager, jit_update], ids=["eager", "nnx.jit"])
def test_matches_numpy_reference_over_batches(update):
    data = batches()
    metric = MinMaxMetric()
    for b in data:
        update(metric, jnp.asarray(b))
    assert as_tuple(metric.compute()) == finite_reference(data) == (-8.25, 9.5)
    assert int(metric.num_nonfinite[...]) == 3  # skipped and counted, as MinMax does


def test_is_a_thin_view_of_minmax():
    data = batches()
    metric, state = MinMaxMetric(), jaxnorm.MinMax.empty()
    for b in data:
        metric.update(anomaly_maps=b)
        state = state.update(b)
        assert as_tuple(metric.compute()) == as_tuple(state)
    # anomalib's checkpoint names: normalization_metrics.min / .max
    assert {"min", "max"} <= set(nnx.state(metric).keys())


def test_empty_and_reset():
    metric = MinMaxMetric()
    assert as_tuple(metric.compute()) == (np.inf, -np.inf)
    assert bool(metric.compute().is_empty)
    for b in batches():
        jit_update(metric, b)
    metric.reset()
    assert as_tuple(metric.compute()) == (np.inf, -np.inf)
    assert int(metric.num_nonfinite[...]) == 0
    jit_update(metric, np.array([[2.0, 3.0]], np.float32))  # usable after a reset
    assert as_tuple(metric.compute()) == (2.0, 3.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
@pytest.mark.parametrize("dtype", [np.bool_, np.float32, np.int32])
def test_mask(jit, dtype):
    data = batches(shape=(4, 1, 8, 8))
    rng = np.random.default_rng(3)
    # Per-image masks broadcast over the map; nnx metrics also take 0/1 masks of any dtype.
    masks = [rng.integers(0, 2, size=(4, 1, 1, 1)).astype(dtype) for _ in data]
    masks[1][0] = 0  # hides the 9.5
    metric = MinMaxMetric()

    def step(metric, values, mask):
        metric.update(anomaly_maps=values, mask=mask)

    step = nnx.jit(step) if jit else step
    for b, m in zip(data, masks, strict=True):
        step(metric, jnp.asarray(b), jnp.asarray(m))
    want = finite_reference(data, [m.astype(bool) for m in masks])
    assert as_tuple(metric.compute()) == want
    assert want[1] < 9.5


def test_inside_multimetric_beside_average_in_nnx_jit():
    data = batches()
    metrics = nnx.MultiMetric(
        loss=nnx.metrics.Average(argname="loss"),
        scores=MinMaxMetric(argname="anomaly_maps"),
    )

    @nnx.jit
    def eval_step(metrics, maps):
        losses = jnp.nanmean(jnp.where(jnp.isfinite(maps), maps, jnp.nan), axis=(1, 2, 3))
        # Extra keyword arguments (labels) are ignored by both metrics.
        metrics.update(loss=losses, anomaly_maps=maps, labels=jnp.arange(maps.shape[0]))

    for b in data:
        eval_step(metrics, jnp.asarray(b))
    out = metrics.compute()
    assert set(out) == {"loss", "scores"}
    assert as_tuple(out["scores"]) == finite_reference(data)
    losses = [np.nanmean(np.where(np.isfinite(b), b, np.nan), axis=(1, 2, 3)) for b in data]
    np.testing.assert_allclose(float(out["loss"]), np.mean(np.concatenate(losses)), rtol=1e-5)
    metrics.reset()
    assert as_tuple(metrics.compute()["scores"]) == (np.inf, -np.inf)


@compat.needs_multimetric_mask_routing
def test_multimetric_mask_per_metric():
    """MultiMetric forwards ``mask``: a dict routes a pixel mask to this metric only."""
    data = batches()
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average(argname="loss"), scores=MinMaxMetric())
    masks = [np.ones((4, 1, 8, 8), bool) for _ in data]
    masks[1][0, 0, 2, 3] = False
    for b, m in zip(data, masks, strict=True):
        metrics.update(loss=jnp.ones(4), anomaly_maps=b, mask={"scores": jnp.asarray(m)})
    assert as_tuple(metrics.compute()["scores"]) == finite_reference(data, masks)
    assert float(metrics.compute()["loss"]) == 1.0


def test_configurable_keys():
    metric = MinMaxMetric(argname="pred_scores", mask_argname="valid")
    metric.update(pred_scores=np.array([1.0, 5.0, -2.0], np.float32), mask=np.zeros(3, bool))
    assert as_tuple(metric.compute()) == (-2.0, 5.0)  # "mask" is not its mask argument
    metric.reset()
    metric.update(
        pred_scores=np.array([1.0, 5.0, -2.0], np.float32), valid=np.array([True, False, True])
    )
    assert as_tuple(metric.compute()) == (-2.0, 1.0)
    no_mask = MinMaxMetric(mask_argname=None)
    no_mask.update(anomaly_maps=np.array([3.0], np.float32), mask=np.array([False]))
    assert as_tuple(no_mask.compute()) == (3.0, 3.0)


def test_missing_key_names_it():
    metric = MinMaxMetric(argname="anomaly_maps")
    with pytest.raises(TypeError, match="'anomaly_maps'.*pred_scores"):
        metric.update(pred_scores=np.ones(3, np.float32))


def test_bad_values_raise_value_error():
    with pytest.raises(ValueError, match="not a real number type"):
        MinMaxMetric().update(anomaly_maps=np.array([True, False]))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
def test_no_recompile_across_batches_of_one_shape(jit):
    data = [jnp.asarray(b) for b in batches(n=6, seed=7)]
    metric = MinMaxMetric()
    step = jit_update if jit else update_eager
    step(metric, data[0])  # compiles once
    with count_compiles() as log:
        for b in data[1:]:
            step(metric, b)
        metric.compute()
    assert log.count == 0, log.names


@pytest.mark.parametrize("n_devices", [1, 8])
def test_sharded_maps_give_global_stats(devices, n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",), devices=devices[:n_devices])
    data = np.random.default_rng(5).normal(size=(16, 1, 8, 8)).astype(np.float32)
    data[13, 0, 4, 4] = 31.0  # extremes on different shards
    data[0, 0, 1, 1] = -12.0
    x = jax.device_put(data, NamedSharding(mesh, P("data")))
    metric = MinMaxMetric()
    jit_update(metric, x)
    assert as_tuple(metric.compute()) == reference.min_max(data) == (-12.0, 31.0)


def test_merge_and_hook_handoff():
    data = batches()
    a, b = MinMaxMetric(), MinMaxMetric()
    for x in data[:2]:
        a.update(anomaly_maps=x)
    for x in data[2:]:
        b.update(anomaly_maps=x)
    a.merge(b)
    assert as_tuple(a.compute()) == finite_reference(data)
    assert int(a.num_nonfinite[...]) == 3
    a.merge(jaxnorm.MinMax(min=jnp.float32(-100.0), max=jnp.float32(0.0)))
    assert as_tuple(a.compute()) == (-100.0, 9.5)
    with pytest.raises(TypeError, match="MinMaxMetric or a jaxnorm.MinMax"):
        a.merge((0.0, 1.0))

    # compute() feeds the Flax hook: test outputs normalize with the metric's statistics.
    hook = jaxnorm.MinMaxNormalizationHook(image_threshold=1.0, pixel_threshold=0.5)
    hook.set_stats(b.compute())
    lo, hi = as_tuple(b.compute())
    raw = {"pred_scores": np.array([0.0, 1.0, 4.0], np.float32), "anomaly_maps": data[0]}
    hook.on_test_start()
    got = hook.on_test_batch_end(raw)
    want = reference.normalize_batch(raw, 1.0, 0.5, lo, hi)
    np.testing.assert_allclose(np.asarray(got["pred_scores"]), want["pred_scores"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["anomaly_maps"]), want["anomaly_maps"], atol=1e-6)
