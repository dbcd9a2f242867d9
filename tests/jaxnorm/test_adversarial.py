"""Adversarial inputs to the core: placements, dtypes, layouts and edge values.

Values are checked against the plain-numpy reference in tests/reference.py; recompiles with
the compile counter.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm._src.compile_counter import count_compiles
from tests import reference

# -- one compilation per layout, whatever the values' placement ----------------------------


_PLACEMENTS = ("device 0", "device 1", "sharded")


def _committed_placements(devices):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    return {
        "device 0": jax.sharding.SingleDeviceSharding(devices[0]),
        "device 1": jax.sharding.SingleDeviceSharding(devices[1]),
        "sharded": NamedSharding(mesh, P("data")),
    }


@pytest.mark.parametrize("where", _PLACEMENTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_hook_fold_compiles_once_for_committed_values(devices, where, accumulate):
    # Committed values (device_put to a device, DLPack imports, a sharded step) used to
    # compile the fold twice: once for the fresh state, once for the state it returned
    # (committed where the values are), and again after each epoch start under accumulate.
    sharding = _committed_placements(devices)[where]
    rng = np.random.default_rng(0)
    hook = jaxnorm.MinMaxNormalizationHook(accumulate=accumulate)
    # a layout no other test uses, so the first fold compiles here
    shape = (8, 3, 5, 7 + 3 * accumulate + _PLACEMENTS.index(where))
    seen = []
    with count_compiles() as log:
        for _ in range(2):
            hook.on_validation_epoch_start()
            for _ in range(3):
                x = rng.normal(size=shape).astype(np.float32)
                seen.append(x)
                hook.on_validation_batch_end({"anomaly_maps": jax.device_put(x, sharding)})
            hook.on_validation_epoch_end()
    folds = [n for n in log.names if "fold" in n or n == "?"]
    assert len(folds) <= 1, log.names
    lo, hi = reference.min_max(*(seen if accumulate else seen[3:]))
    assert hook.host_stats()["pixel"] == (lo, hi)


@pytest.mark.parametrize("where", _PLACEMENTS)
def test_minmax_update_compiles_once_for_committed_values(devices, where):
    sharding = _committed_placements(devices)[where]
    rng = np.random.default_rng(1)
    shape = (8, 11, 3 + _PLACEMENTS.index(where))
    xs = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    stats = jaxnorm.MinMax.empty()
    with count_compiles() as log:
        for x in xs:
            stats = stats.update(jax.device_put(x, sharding))
    assert log.count <= 1, log.names
    lo, hi = reference.min_max(*xs)
    assert (float(stats.min), float(stats.max)) == (lo, hi)


# -- numpy layouts jax does not read as they are -------------------------------------------


@pytest.mark.parametrize("dtype", [">f4", ">f2", ">i4", ">i8", ">f8", ">u2"])
def test_big_endian_arrays_give_the_values_they_hold(dtype):
    # jax read a non-native byte order as native bytes: >f4 [0, 1, 2] normalized to 0.25 each.
    raw = np.array([[0, 1, 2], [3, 5, 4]], dtype)
    native = raw.astype(np.float64)
    want = reference.normalize(native, 1.5, 0.0, 5.0)
    got = jaxnorm.normalize(raw, 1.5, 0.0, 5.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-3)
    stats = jaxnorm.MinMax.empty().update(raw)
    assert (float(stats.min), float(stats.max)) == reference.min_max(native)

    hook = jaxnorm.MinMaxNormalizationHook(image_threshold=1.5, pixel_threshold=2.5)
    hook.on_validation_batch_end({"box_scores": [raw[0], raw[1, :2]], "pred_scores": raw[:, 0]})
    assert hook.host_stats()["pixel"] == reference.min_max(native[0], native[1, :2])
    out = hook.on_test_batch_end({"pred_scores": raw[:, 1], "box_scores": [raw[1]]})
    lo, hi = reference.min_max(native[0], native[1, :2])
    np.testing.assert_allclose(
        np.asarray(out["pred_scores"]), reference.normalize(native[:, 1], 1.5, lo, hi), rtol=1e-3
    )
    np.testing.assert_allclose(
        np.asarray(out["box_scores"][0]), reference.normalize(native[1], 2.5, lo, hi), rtol=1e-3
    )


def test_float64_beyond_float32_is_inf_without_a_numpy_warning():
    # numpy's cast warned "overflow encountered in cast" (an error under filterwarnings=error).
    raw = np.array([1e300, -1e300, 1.0, 2.0])
    got = jaxnorm.normalize(raw, 1.0, 0.0, 2.0)
    np.testing.assert_array_equal(np.asarray(got), [1.0, 0.0, 0.5, 1.0])
    stats, n_bad = jaxnorm.MinMax.empty().update_and_count(raw)
    assert (float(stats.min), float(stats.max), int(n_bad)) == (1.0, 2.0, 2)
    hook = jaxnorm.MinMaxNormalizationHook(nonfinite="omit")
    hook.on_validation_batch_end({"anomaly_maps": raw, "box_scores": [raw]})
    assert hook.host_stats()["pixel"] == (1.0, 2.0)
    assert hook.num_nonfinite == {"image": 2, "pixel": 2}


# -- ragged box scores of mixed dtypes and shapes ------------------------------------------


def _boxes():
    return [
        np.array([1], np.int64),
        np.array([2.5], np.float16),
        jax.numpy.array([3.0, 0.5], jax.numpy.bfloat16),
        np.array([], np.float32),
        np.array([4.0]),
        np.float32(5.0),
    ]


@pytest.mark.parametrize("on_host", [False, True])
def test_boxes_of_mixed_dtypes_fold_and_come_back_each_as_normalize_returns_it(on_host):
    # bfloat16 beside float16 crashed in numpy's promotion; each box came back in the
    # common dtype of the batch (an int box as float16), and a 0-d box as shape (1,).
    boxes = _boxes()
    flat = [np.asarray(b, np.float64).reshape(-1) for b in boxes]
    hook = jaxnorm.MinMaxNormalizationHook(pixel_threshold=2.0)
    hook.on_validation_batch_end({"box_scores": boxes})
    lo, hi = reference.min_max(*flat)
    assert hook.host_stats()["pixel"] == (lo, hi)
    out = hook.normalize_batch({"box_scores": boxes}, boxes_on_host=on_host)["box_scores"]
    assert len(out) == len(boxes)
    for got, box, raw in zip(out, boxes, flat, strict=True):
        alone = jaxnorm.normalize(box, 2.0, lo, hi)
        assert (got.dtype, got.shape) == (alone.dtype, alone.shape)
        np.testing.assert_allclose(
            np.asarray(got, np.float64).reshape(-1),
            reference.normalize(raw, 2.0, lo, hi),
            rtol=1e-2,
        )


# -- MinMax edge cases -----------------------------------------------------------------------


def test_reduce_of_a_stack_of_no_states_is_the_empty_state():
    stacked = jaxnorm.MinMax(min=np.zeros((0,), np.float32), max=np.zeros((0,), np.float32))
    reduced = stacked.reduce()
    assert (float(reduced.min), float(reduced.max)) == (np.inf, -np.inf)
    assert bool(reduced.is_empty)


# -- persistence: what comes from outside ----------------------------------------------------


def _trained(**kwargs):
    hook = jaxnorm.MinMaxNormalizationHook(1.25, 2.5, **kwargs)
    hook.on_validation_batch_end(
        {
            "anomaly_maps": np.array([[0.0, 4.0]], np.float32),
            "pred_scores": np.array([1.0, 3.0], np.float32),
        }
    )
    return hook


@pytest.mark.parametrize("counts", ["x", [1], 3])
def test_state_dict_counters_that_are_not_a_dict_are_named(counts):
    state = dict(_trained().state_dict(), num_values=counts)
    with pytest.raises(ValueError, match=r"state\['num_values'\].*expected a dict of counts"):
        jaxnorm.MinMaxNormalizationHook().load_state_dict(state)


def test_state_dict_stats_of_the_wrong_type_are_named():
    state = dict(_trained().state_dict(), stats=[1, 2])
    with pytest.raises(ValueError, match="'stats' is list"):
        jaxnorm.MinMaxNormalizationHook().load_state_dict(state)


def test_separate_statistics_loaded_into_a_shared_hook_are_all_kept():
    # A shared hook exports one pair: the pixel statistics were dropped from its JSON.
    saved = _trained(stats="separate")
    for load in ("load_state_dict", "set_stats"):
        hook = jaxnorm.MinMaxNormalizationHook()
        if load == "load_state_dict":
            hook.load_state_dict(saved.state_dict())
        else:
            hook.set_stats(saved.stats)
        assert hook.stats_mode == "separate"
        again = jaxnorm.MinMaxNormalizationHook.from_json(hook.to_json())
        assert again.host_stats() == {"image": (1.0, 3.0), "pixel": (0.0, 4.0)}


def test_load_json_refuses_an_int_source_instead_of_opening_a_file_descriptor():
    with pytest.raises(ValueError, match="expected a path, a JSON string or a dict, got int"):
        jaxnorm.MinMaxNormalizationHook().load_json(0)


def test_load_json_bytes_and_bad_json_and_odd_keys(tmp_path):
    text = _trained().to_json()
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.load_json(text.encode())
    assert hook.host_stats()["image"] == (0.0, 4.0)
    with pytest.raises(ValueError, match="metadata: the JSON text given is not valid JSON"):
        hook.load_json('{"min": 0, ')
    path = tmp_path / "meta.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="meta.json' is not valid JSON"):
        hook.load_json(path)
    with pytest.raises(ValueError, match="no 'min'/'max'"):
        hook.load_json({1: 2, "a": 3})
    assert hook.host_stats()["image"] == (0.0, 4.0)


# -- batch sizes: the documented bound of compilations ---------------------------------------


def test_validation_compiles_at_most_log2_largest_plus_two_times():
    # batching's bound: a power-of-two size run exactly and the same bucket reached by
    # padding were two compilations of the fold (sizes without and with a row count).
    rng = np.random.default_rng(3)
    hook = jaxnorm.MinMaxNormalizationHook(nonfinite="omit")
    sizes = [37, *range(1, 65), *range(64, 0, -1)]
    seen = []
    with count_compiles() as log:
        for n in sizes:
            x = rng.normal(size=(n, 3, 5)).astype(np.float32)
            seen.append(x)
            hook.on_validation_batch_end({"anomaly_maps": x})
    assert log.count <= int(np.log2(64)) + 2, log.names
    assert hook.host_stats()["pixel"] == reference.min_max(*seen)
    assert hook.num_values["pixel"] == sum(x.size for x in seen)


@pytest.mark.parametrize(
    "out",
    [None, (np.zeros(1), np.zeros(1), np.zeros(2, np.int64)), (np.zeros(2),) * 2, "abc"],
    ids=["none", "short", "two", "str"],
)
def test_a_reducer_that_returns_the_wrong_layout_is_named(out):
    hook = jaxnorm.MinMaxNormalizationHook(reducer=lambda mins, maxs, counts: out)
    hook.on_validation_batch_end({"pred_scores": np.array([0.0, 2.0])})
    with pytest.raises(ValueError, match=r"reducer returned .*expected \(mins, maxs, counts\)"):
        hook.on_validation_epoch_end()


# -- empty batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_empty_batches_sharded_over_a_mesh_normalize_to_empty(devices, axis_type):
    # jax's select failed to lower on an empty array over an explicit mesh axis (the
    # default of jax.make_mesh in recent jax): normalizing a 0-row batch raised.
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(kind,), devices=devices)
    sharding = NamedSharding(mesh, P("data"))
    empty = jax.device_put(np.zeros((0, 3), np.float32), sharding)
    scores = jax.device_put(np.zeros((0,), np.float16), sharding)
    got = jaxnorm.normalize(empty, 0.5, 0.0, 1.0)
    assert (got.shape, got.dtype) == ((0, 3), np.float32)
    hook = jaxnorm.MinMaxNormalizationHook.from_json('{"min": 0.0, "max": 1.0}')
    out = hook.on_test_batch_end({"anomaly_maps": empty, "pred_scores": scores})
    assert out["anomaly_maps"].shape == (0, 3)
    assert (out["pred_scores"].shape, out["pred_scores"].dtype) == ((0,), np.float16)
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"anomaly_maps": empty})
    assert hook.host_stats()["pixel"] == (np.inf, -np.inf)


@pytest.mark.parametrize("where", _PLACEMENTS)
def test_nnx_metric_updates_compile_once_for_committed_values(devices, where):
    # The metric's fresh count (uncommitted) plus a committed count compiled the addition
    # again at the second update (and, on flax < 0.12, the [...] scatters too).
    from jaxnorm.nnx import MinMaxMetric

    sharding = _committed_placements(devices)[where]
    rng = np.random.default_rng(4)
    xs = [
        rng.normal(size=(8, 13, 1 + _PLACEMENTS.index(where))).astype(np.float32) for _ in range(4)
    ]
    xs[2][0, 0, 0] = np.nan
    metric = MinMaxMetric()
    metric.update(anomaly_maps=jax.device_put(xs[0], sharding))
    with count_compiles() as log:
        for x in xs[1:]:
            metric.update(anomaly_maps=jax.device_put(x, sharding))
    assert log.count == 0, log.names
    stats = metric.compute()
    finite = [x[np.isfinite(x)] for x in xs]
    assert (float(stats.min), float(stats.max)) == reference.min_max(*finite)
    assert int(metric.num_nonfinite[...]) == 1


def test_batches_sharded_over_an_explicit_mesh_fold_and_normalize(devices):
    # jax < 0.7 has no sharding rule for a scatter over an explicit mesh: the hook's fold
    # (and the nnx metric's [...] assignment) raised ShardingTypeError on the floor's jax.
    from jaxnorm.nnx import MinMaxMetric

    kind = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(kind,), devices=devices)
    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(5)
    raw = [rng.normal(size=(16, 3)).astype(np.float32) for _ in range(2)]
    xs = [jax.device_put(x, sharding) for x in raw]
    lo, hi = reference.min_max(*raw)
    hook = jaxnorm.MinMaxNormalizationHook(pixel_threshold=0.25)
    for x in xs:
        hook.on_validation_batch_end({"anomaly_maps": x})
    assert hook.host_stats()["pixel"] == (lo, hi)
    assert hook.num_values["pixel"] == sum(x.size for x in raw)
    out = hook.on_test_batch_end({"anomaly_maps": xs[0]})["anomaly_maps"]
    np.testing.assert_allclose(
        np.asarray(out), reference.normalize(raw[0], 0.25, lo, hi), rtol=1e-6, atol=1e-7
    )
    stats = jaxnorm.MinMax.empty().update(xs[0]).update(xs[1])
    assert (float(stats.min), float(stats.max)) == (lo, hi)
    metric = MinMaxMetric()
    for x in xs:
        metric.update(anomaly_maps=x)
    assert (float(metric.compute().min), float(metric.compute().max)) == (lo, hi)


# -- normalize: scalars of every host type beside device statistics --------------------------


@pytest.mark.parametrize(
    "threshold",
    [0.5, np.float32(0.5), np.float64(0.5), 1, np.array(0.5), np.int8(1)],
    ids=["float", "np.float32", "np.float64", "int", "0-d array", "np.int8"],
)
def test_a_host_threshold_beside_device_statistics_reads_them_once(threshold, monkeypatch):
    # Any threshold but a Python float (numpy scalars, ints, 0-d arrays) read the statistics
    # arrays back to the host at every call: a wait per batch.
    from jaxnorm._src import validation

    reads = []
    real = validation.host_scalars
    monkeypatch.setattr(validation, "host_scalars", lambda *a: reads.append(1) or real(*a))
    stats = jax.block_until_ready(jaxnorm.MinMax.empty().update(jax.numpy.arange(5.0)))
    x = jax.numpy.linspace(-1.0, 6.0, 9)
    want = reference.normalize(np.asarray(x), float(threshold), 0.0, 4.0)
    for _ in range(4):
        got = jaxnorm.normalize(x, threshold, stats.min, stats.max)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert len(reads) <= 1


@pytest.mark.parametrize("bad", [True, np.bool_(False), np.nan, np.float32(np.inf), "1", None])
def test_bad_host_thresholds_beside_device_statistics_are_refused(bad):
    stats = jaxnorm.MinMax.empty().update(jax.numpy.arange(5.0))
    with pytest.raises(ValueError, match="threshold"):
        jaxnorm.normalize(jax.numpy.ones(3), bad, stats.min, stats.max)


def test_repr_neither_raises_nor_swallows_a_pending_non_finite_error():
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.on_validation_batch_end({"pred_scores": np.array([1.0, 2.0])})
    hook.on_validation_batch_end({"pred_scores": np.array([np.nan, 5.0])})
    assert "image=[1, 2]" in repr(hook)
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="'pred_scores'"):
        hook.on_validation_epoch_end()


def test_masked_arrays_are_refused_naming_the_key():
    masked = np.ma.array([[1.0, 1e9]], mask=[[False, True]])
    with pytest.raises(ValueError, match="anomaly_maps: a numpy masked array"):
        jaxnorm.MinMaxNormalizationHook().on_validation_batch_end({"anomaly_maps": masked})
    with pytest.raises(ValueError, match="values: a numpy masked array.*mask=~arr.mask"):
        jaxnorm.MinMax.empty().update(masked)


def test_hook_fold_compiles_once_across_reduced_and_reloaded_epochs(devices):
    # A reducer's statistics and a loaded state are installed uncommitted beside committed
    # counters: the next fold places them again instead of compiling for the mixed state.
    sharding = jax.sharding.SingleDeviceSharding(devices[1])
    rng = np.random.default_rng(6)
    hook = jaxnorm.MinMaxNormalizationHook(accumulate=True, reducer=lambda *a: a)
    saved = jaxnorm.MinMaxNormalizationHook()
    saved.set_stats(jaxnorm.MinMax(min=np.float32(-9.0), max=np.float32(9.0)))
    seen = []
    with count_compiles() as log:
        for epoch in range(3):
            if epoch == 2:
                hook.load_state_dict(saved.state_dict())
            hook.on_validation_epoch_start()
            for _ in range(2):
                x = rng.normal(size=(8, 3, 5, 13)).astype(np.float32)
                seen.append(x)
                hook.on_validation_batch_end({"anomaly_maps": jax.device_put(x, sharding)})
            hook.on_validation_epoch_end()
    folds = [n for n in log.names if "fold" in n or n == "?"]
    assert len(folds) <= 1, log.names
    lo, hi = reference.min_max(*seen[4:], np.array([-9.0, 9.0]))
    assert hook.host_stats()["pixel"] == (lo, hi)


# -- the functional API: what it is handed ----------------------------------------------------


def test_functional_api_names_wrong_stats_and_outputs():
    outputs = {"pred_scores": np.array([0.0, 1.0, 3.0])}
    with pytest.raises(ValueError, match="update_stats: stats is a MinMax"):
        jaxnorm.update_stats(jaxnorm.MinMax.empty(), outputs)
    with pytest.raises(ValueError, match="outputs: expected a dict"):
        jaxnorm.normalize_outputs([np.ones(2)], jaxnorm.NormalizationStats.empty(), 0.5, 0.5)
    with pytest.raises(ValueError, match="which='pxel'"):
        jaxnorm.NormalizationStats.empty().get("pxel")
    with pytest.raises(TypeError, match="expected a NormalizationStats, got MinMax"):
        jaxnorm.NormalizationStats.empty().merge(jaxnorm.MinMax.empty())
    # A single MinMax serves image and pixel statistics, eagerly and under jit.
    stats = jaxnorm.MinMax.empty().update(np.array([0.0, 4.0]))
    want = reference.normalize(outputs["pred_scores"], 1.0, 0.0, 4.0)
    for fn in (jaxnorm.normalize_outputs, jax.jit(jaxnorm.normalize_outputs)):
        got = fn(outputs, stats, 1.0, 2.0)["pred_scores"]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_hook_that_folded_committed_values_copies_and_pickles(devices, how):
    # The fold's placement cache holds a sharding, whose device does not pickle.
    import copy
    import pickle

    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(4, 1, 8, 8)).astype(np.float32) for _ in range(3)]
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.on_validation_epoch_start()
    for b in batches[:2]:
        hook.on_validation_batch_end({"anomaly_maps": jax.device_put(b, devices[1])})
    twin = copy.deepcopy(hook) if how == "deepcopy" else pickle.loads(pickle.dumps(hook))
    for h in (hook, twin):
        h.on_validation_batch_end({"anomaly_maps": jax.device_put(batches[2], devices[1])})
        h.on_validation_epoch_end()
        lo, hi = h.host_stats()["image"]
        assert (lo, hi) == reference.min_max(*batches)
