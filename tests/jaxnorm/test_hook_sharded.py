"""The hook and the functional API on batches sharded over a device mesh (8 simulated CPU
devices, see conftest.py): global statistics, and normalized outputs that stay sharded."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from tests import compat, reference

IMAGE_THRESHOLD, PIXEL_THRESHOLD = 0.25, 0.75
BATCH = 16


def make_batch(rng, lo, hi):
    return {
        "anomaly_maps": rng.uniform(lo, hi, (BATCH, 1, 8, 8)).astype(np.float32),
        "pred_scores": rng.uniform(lo - 1, hi + 1, (BATCH,)).astype(np.float32),
        "label": np.arange(BATCH),
    }


@pytest.fixture(scope="module")
def batches():
    """Validation batches whose extremes sit on single devices' shards."""
    rng = np.random.default_rng(7)
    out = [make_batch(rng, -1.0, 1.0) for _ in range(3)]
    out[0]["anomaly_maps"][13, 0, 2, 6] = 5.5  # last device of 8
    out[2]["anomaly_maps"][1, 0, 7, 0] = -4.25  # first device
    out[1]["pred_scores"][9] = -8.0
    out[2]["pred_scores"][6] = 9.0
    return out


@pytest.fixture(scope="module")
def test_batch():
    return make_batch(np.random.default_rng(8), -5.0, 6.0)


def make_mesh(devices, shape):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, ("data", "model")[: len(shape)], devices=devices[:n])


def shard(batch, mesh, map_spec):
    """``anomaly_maps`` with ``map_spec``, ``pred_scores`` over the batch axis."""
    return {
        "anomaly_maps": jax.device_put(batch["anomaly_maps"], NamedSharding(mesh, map_spec)),
        "pred_scores": jax.device_put(batch["pred_scores"], NamedSharding(mesh, P("data"))),
        "label": batch["label"],
    }


def host_stats(stats: jaxnorm.NormalizationStats):
    return {
        w: (float(getattr(stats, w).min), float(getattr(stats, w).max)) for w in ("image", "pixel")
    }


def want_stats(batches, mode):
    if mode == "shared":
        s = reference.min_max(*[b["anomaly_maps"] for b in batches])
        return {"image": s, "pixel": s}
    return {
        "image": reference.min_max(*[b["pred_scores"] for b in batches]),
        "pixel": reference.min_max(*[b["anomaly_maps"] for b in batches]),
    }


# (mesh shape, anomaly_maps spec): 1 device, 8 devices on the batch axis, and a 4x2 mesh
# that also splits the rows of each map.
MESHES = [((1,), P("data")), ((8,), P("data")), ((4, 2), P("data", None, "model"))]
MESH_IDS = ["1dev", "8dev", "4x2dev"]


@pytest.mark.parametrize("mode", ["shared", "separate"])
@pytest.mark.parametrize("mesh_shape, spec", MESHES, ids=MESH_IDS)
def test_hook_on_sharded_batches_gives_global_stats(devices, batches, mesh_shape, spec, mode):
    mesh = make_mesh(devices, mesh_shape)
    sharded = jaxnorm.MinMaxNormalizationHook(stats=mode)
    plain = jaxnorm.MinMaxNormalizationHook(stats=mode)
    for hook, put in ((sharded, lambda b: shard(b, mesh, spec)), (plain, lambda b: b)):
        hook.on_validation_epoch_start()
        for b in batches:
            out = put(b)
            assert hook.on_validation_batch_end(out) is out
        hook.on_validation_epoch_end()  # one process: no reduction
    assert sharded.host_stats() == plain.host_stats() == want_stats(batches, mode)
    assert len(shard(batches[0], mesh, spec)["anomaly_maps"].sharding.device_set) == len(
        mesh.devices.flat
    )


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mesh_shape, spec", MESHES, ids=MESH_IDS)
def test_update_stats_and_minmax_on_sharded_batches(devices, batches, mesh_shape, spec, use_jit):
    mesh = make_mesh(devices, mesh_shape)
    update = jaxnorm.update_stats
    if use_jit:
        update = jax.jit(update, static_argnames="mode")
    stats = jaxnorm.NormalizationStats.empty()
    minmax = jaxnorm.MinMax.empty()
    for b in batches:
        s = shard(b, mesh, spec)
        stats = update(stats, s, mode="separate")
        minmax = minmax.update(s["anomaly_maps"])
    assert host_stats(stats) == want_stats(batches, "separate")
    assert (float(minmax.min), float(minmax.max)) == want_stats(batches, "shared")["pixel"]


@pytest.mark.parametrize("mesh_shape, spec", MESHES, ids=MESH_IDS)
def test_normalized_outputs_stay_sharded_and_equal_the_unsharded_run(
    devices, batches, test_batch, mesh_shape, spec
):
    mesh = make_mesh(devices, mesh_shape)
    hook = jaxnorm.MinMaxNormalizationHook(IMAGE_THRESHOLD, PIXEL_THRESHOLD)
    hook.on_validation_epoch_start()
    for b in batches:
        hook.on_validation_batch_end(shard(b, mesh, spec))
    hook.on_validation_epoch_end()
    hook.on_test_start()

    inputs = shard(test_batch, mesh, spec)
    got = hook.on_test_batch_end(inputs)
    plain = hook.on_test_batch_end(test_batch)
    lo, hi = want_stats(batches, "shared")["pixel"]
    for key, threshold in (("anomaly_maps", PIXEL_THRESHOLD), ("pred_scores", IMAGE_THRESHOLD)):
        x, y = inputs[key], got[key]
        # Same layout as the input: every device normalized its own shard, nothing gathered.
        assert y.sharding.is_equivalent_to(x.sharding, x.ndim), (key, y.sharding, x.sharding)
        assert [s.data.shape for s in y.addressable_shards] == [
            s.data.shape for s in x.addressable_shards
        ]
        np.testing.assert_array_equal(np.asarray(y), np.asarray(plain[key]), err_msg=key)
        np.testing.assert_allclose(
            np.asarray(y), reference.normalize(test_batch[key], threshold, lo, hi), atol=1e-6
        )
        # predict is the same rewrite
        y2 = hook.on_predict_batch_end(inputs)[key]
        assert y2.sharding.is_equivalent_to(x.sharding, x.ndim)

        direct = jaxnorm.normalize(x, threshold, lo, hi)
        assert direct.sharding.is_equivalent_to(x.sharding, x.ndim)
        np.testing.assert_array_equal(np.asarray(direct), np.asarray(y))
    assert got["label"] is inputs["label"]


@pytest.mark.parametrize("n_devices", [1, 8])
def test_box_scores_come_back_on_their_devices(devices, batches, n_devices):
    """Ragged boxes are per-image arrays; each normalized array stays on its device."""
    rng = np.random.default_rng(3)
    boxes = [rng.uniform(-2, 2, (k,)).astype(np.float32) for k in (3, 0, 5, 1, 2, 4, 0, 6)]
    placed = [jax.device_put(b, devices[i % n_devices]) for i, b in enumerate(boxes)]
    hook = jaxnorm.MinMaxNormalizationHook(pixel_threshold=PIXEL_THRESHOLD)
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"box_scores": placed})
    hook.on_validation_epoch_end()
    assert hook.host_stats()["pixel"] == reference.min_max(*boxes)
    out = hook.on_test_batch_end({"box_scores": placed, "pred_scores": np.zeros(8, np.float32)})
    lo, hi = reference.min_max(*boxes)
    for x, y, b in zip(placed, out["box_scores"], boxes, strict=True):
        assert y.devices() == x.devices()
        np.testing.assert_allclose(
            np.asarray(y), reference.normalize(b, PIXEL_THRESHOLD, lo, hi), atol=1e-6
        )


@pytest.mark.parametrize("mesh_shape, spec", MESHES, ids=MESH_IDS)
def test_shard_map_eval_step_with_reduce(devices, batches, test_batch, mesh_shape, spec):
    """The documented shard_map recipe: fold locally, ``reduce(axis_names)``, normalize."""
    mesh = make_mesh(devices, mesh_shape)
    axes = mesh.axis_names
    specs = {"anomaly_maps": spec, "pred_scores": P("data")}

    @jax.jit
    @functools.partial(compat.shard_map, mesh=mesh, in_specs=(P(), specs), out_specs=(P(), P()))
    def val_step(stats, outputs):
        local = jaxnorm.update_stats(stats, outputs, mode="separate")
        # Every device gets the global state; merge is idempotent, so reducing the carried
        # (already global) part again is harmless. MinMax.reduce takes the same names.
        return local.reduce(axes), local.pixel.reduce(axes)

    @jax.jit
    @functools.partial(compat.shard_map, mesh=mesh, in_specs=(P(), specs), out_specs=specs)
    def test_step(stats, outputs):
        return jaxnorm.normalize_outputs(outputs, stats, IMAGE_THRESHOLD, PIXEL_THRESHOLD)

    stats = jaxnorm.NormalizationStats.empty()
    for b in batches:
        s = shard(b, mesh, spec)
        stats, pixel = val_step(stats, {k: s[k] for k in specs})
    assert host_stats(stats) == want_stats(batches, "separate")
    assert (float(pixel.min), float(pixel.max)) == want_stats(batches, "separate")["pixel"]

    # The stats hand over to the hook, and both normalize the same, still sharded.
    hook = jaxnorm.MinMaxNormalizationHook(IMAGE_THRESHOLD, PIXEL_THRESHOLD, stats="separate")
    hook.set_stats(stats)
    inputs = {k: v for k, v in shard(test_batch, mesh, spec).items() if k in specs}
    got = test_step(stats, inputs)
    from_hook = hook.on_test_batch_end(inputs)
    for key in specs:
        assert got[key].sharding.is_equivalent_to(inputs[key].sharding, inputs[key].ndim)
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(from_hook[key]), atol=1e-6)
