"""MinMaxNormalizationHook against the numpy reference of SPEC sections 1 and 2."""

import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm.testing import count_compiles
from tests import reference

IMAGE_T, PIXEL_T = 1.3, 0.7


def batch(rng, n=4, boxes=True, scale=1.0, shift=0.0):
    """One batch of raw model outputs with all three keys (one image without boxes)."""
    out = {
        "anomaly_maps": rng.normal(shift, scale, size=(n, 1, 8, 8)).astype(np.float32),
        "pred_scores": rng.normal(shift + 1, scale, size=(n,)).astype(np.float32),
        "label": np.arange(n),
    }
    if boxes:
        counts = rng.integers(0, 5, size=n)
        counts[0] = 0
        out["box_scores"] = [rng.normal(shift, scale, size=c).astype(np.float32) for c in counts]
    return out


def as_jax(outputs):
    return {
        k: ([jnp.asarray(b) for b in v] if k == "box_scores" else jnp.asarray(v))
        for k, v in outputs.items()
    }


def assert_normalized(got, raw, image_t, pixel_t, lo, hi):
    want = reference.normalize_batch(raw, image_t, pixel_t, lo, hi)
    assert set(got) == set(raw)
    if "label" in raw:  # other keys pass through untouched
        np.testing.assert_array_equal(got["label"], raw["label"])
    for key in ("pred_scores", "anomaly_maps"):
        if key in raw:
            assert got[key].shape == raw[key].shape
            np.testing.assert_allclose(np.asarray(got[key]), want[key], atol=1e-6)
    if "box_scores" in raw:
        assert len(got["box_scores"]) == len(raw["box_scores"])
        for g, w in zip(got["box_scores"], want["box_scores"], strict=True):
            assert isinstance(g, jax.Array) and g.shape == w.shape
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-6)


def run_validation(hook, batches):
    hook.on_validation_epoch_start()
    for b in batches:
        assert hook.on_validation_batch_end(b) is b
    hook.on_validation_epoch_end()


@pytest.mark.parametrize("to_jax", [False, True], ids=["numpy", "jax"])
def test_scenario_matches_reference(to_jax):
    rng = np.random.default_rng(0)
    val = [batch(rng, scale=s) for s in (1.0, 2.0, 0.5)]
    test = [batch(rng, scale=3.0), batch(rng, boxes=False)]
    predict = [{"pred_scores": rng.normal(size=5).astype(np.float32)}]
    conv = as_jax if to_jax else (lambda x: x)

    hook = jaxnorm.MinMaxNormalizationHook(image_threshold=IMAGE_T, pixel_threshold=PIXEL_T)
    run_validation(hook, [conv(b) for b in val])
    # shared stats come from anomaly maps (they take precedence over boxes and scores)
    lo, hi = reference.min_max(*[reference.stats_source(b) for b in val])
    assert hook.host_stats() == {"image": (lo, hi), "pixel": (lo, hi)}

    hook.on_test_start()
    passthrough = conv(test[0])
    assert hook.on_test_batch_end(passthrough)["label"] is passthrough["label"]
    for raw in test:
        assert_normalized(hook.on_test_batch_end(conv(raw)), raw, IMAGE_T, PIXEL_T, lo, hi)
    for raw in predict:
        assert_normalized(hook.on_predict_batch_end(conv(raw)), raw, IMAGE_T, PIXEL_T, lo, hi)


def test_stats_source_precedence_boxes_then_scores():
    rng = np.random.default_rng(1)
    b = batch(rng)
    boxes_only = {"box_scores": b["box_scores"], "pred_scores": b["pred_scores"] + 100}
    hook = jaxnorm.MinMaxNormalizationHook()
    run_validation(hook, [boxes_only])
    assert hook.host_stats()["image"] == reference.min_max(*b["box_scores"])
    run_validation(hook, [{"pred_scores": b["pred_scores"]}])
    assert hook.host_stats()["image"] == reference.min_max(b["pred_scores"])


def test_missing_keys_raise_anomalib_message_and_keep_stats():
    hook = jaxnorm.MinMaxNormalizationHook()
    run_validation(hook, [{"pred_scores": np.array([1.0, 2.0])}])
    with pytest.raises(ValueError, match="^" + reference.NO_VALUES_MESSAGE + "$"):
        hook.on_validation_batch_end({"image": np.zeros(3)})
    with pytest.raises(ValueError, match="^" + reference.NO_VALUES_MESSAGE + "$"):
        hook.on_test_batch_end({"image": np.zeros(3)})
    assert hook.host_stats()["image"] == (1.0, 2.0)


def test_reset_each_epoch_by_default_and_accumulate_option():
    sanity = {"anomaly_maps": np.array([-50.0, 80.0])}  # the sanity check's wild extremes
    epoch = {"anomaly_maps": np.array([0.0, 1.0])}
    reset = jaxnorm.MinMaxNormalizationHook()
    keep = jaxnorm.MinMaxNormalizationHook(accumulate=True)
    for hook in (reset, keep):
        run_validation(hook, [sanity])
        run_validation(hook, [epoch])
    assert reset.host_stats()["image"] == (0.0, 1.0)
    assert keep.host_stats()["image"] == (-50.0, 80.0)


def test_separate_stats():
    val = {
        "pred_scores": np.array([10.0, 30.0], np.float32),
        "anomaly_maps": np.array([[0.0, 2.0]], np.float32),
    }
    hook = jaxnorm.MinMaxNormalizationHook(20.0, 1.0, stats="separate")
    run_validation(hook, [val])
    assert hook.host_stats() == {"image": (10.0, 30.0), "pixel": (0.0, 2.0)}
    got = hook.on_test_batch_end(val)
    np.testing.assert_allclose(
        got["pred_scores"], reference.normalize(val["pred_scores"], 20, 10, 30)
    )
    np.testing.assert_allclose(
        got["anomaly_maps"], reference.normalize(val["anomaly_maps"], 1, 0, 2)
    )
    # shared (the default) uses the maps' range for scores too: a different answer
    shared = jaxnorm.MinMaxNormalizationHook(20.0, 1.0)
    run_validation(shared, [val])
    assert shared.host_stats()["image"] == (0.0, 2.0)


def test_separate_stats_missing_pixel_source_is_a_clear_error():
    hook = jaxnorm.MinMaxNormalizationHook(stats="separate")
    run_validation(hook, [{"pred_scores": np.array([1.0, 2.0])}])
    hook.on_test_batch_end({"pred_scores": np.array([1.5])})  # image stats are there
    with pytest.raises(jaxnorm.StatisticsMissingError, match="no pixel normalization statistics"):
        hook.on_test_batch_end({"pred_scores": np.array([1.5]), "anomaly_maps": np.ones((1, 2))})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raises_with_key_and_count_and_loses_nothing(bad):
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"anomaly_maps": np.array([0.0, 1.0])})
    maps = np.array([5.0, bad, bad, -5.0])
    hook.on_validation_batch_end({"anomaly_maps": maps})  # decided on the device: no raise yet
    hook.on_validation_batch_end({"anomaly_maps": np.array([0.5])})  # later batches still fold
    with pytest.raises(jaxnorm.NonFiniteScoresError, match=r"2 non-finite .* 'anomaly_maps'") as e:
        hook.on_validation_epoch_end()
    assert (e.value.key, e.value.count) == ("anomaly_maps", 2)
    assert "validation batch 1 of this epoch" in str(e.value)
    assert hook.host_stats()["image"] == (0.0, 1.0)  # the bad batch was not folded in
    assert isinstance(e.value, ValueError)


def test_nonfinite_in_full_size_maps_raises():
    maps = np.random.default_rng(0).normal(size=(32, 1, 64, 64)).astype(np.float32)
    maps[17, 0, 5, 9] = np.nan
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.on_validation_batch_end({"anomaly_maps": jnp.asarray(maps)})
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="1 non-finite .* 'anomaly_maps'"):
        hook.on_validation_epoch_end()


def test_nonfinite_error_names_the_batch_of_this_epoch_also_when_accumulating():
    hook = jaxnorm.MinMaxNormalizationHook(accumulate=True)
    run_validation(hook, [{"pred_scores": np.array([1.0])}] * 3)
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"pred_scores": np.array([2.0])})
    hook.on_validation_batch_end({"pred_scores": np.array([np.nan])})
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="validation batch 1 of this epoch"):
        hook.on_validation_epoch_end()


def test_nonfinite_omit_skips_and_counts():
    hook = jaxnorm.MinMaxNormalizationHook(nonfinite="omit")
    run_validation(
        hook,
        [{"anomaly_maps": np.array([0.0, np.nan, 3.0])}, {"anomaly_maps": np.array([np.inf, 1.0])}],
    )
    assert hook.host_stats()["image"] == (0.0, 3.0)
    assert hook.num_nonfinite == {"image": 2, "pixel": 2}  # shared: one source for both
    assert hook.num_values["image"] == 5


def test_nonfinite_box_scores_counted_with_key():
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.on_validation_batch_end({"box_scores": [np.array([1.0]), np.array([np.nan, 2.0])]})
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="1 non-finite .* 'box_scores'"):
        hook.on_validation_epoch_end()


def test_no_stats_is_a_clear_error_not_half():
    hook = jaxnorm.MinMaxNormalizationHook()
    with pytest.raises(jaxnorm.StatisticsMissingError, match="run validation .* or load"):
        hook.on_test_start()
    with pytest.raises(jaxnorm.StatisticsMissingError, match="0.5"):
        hook.on_predict_batch_end({"pred_scores": np.array([1.0])})
    # all values non-finite under omit: still no statistics
    omit = jaxnorm.MinMaxNormalizationHook(nonfinite="omit")
    run_validation(omit, [{"pred_scores": np.array([np.nan])}])
    with pytest.raises(jaxnorm.StatisticsMissingError):
        omit.on_test_batch_end({"pred_scores": np.array([1.0])})


def test_degenerate_range():
    hook = jaxnorm.MinMaxNormalizationHook(image_threshold=2.0, pixel_threshold=2.0)
    run_validation(hook, [{"pred_scores": np.array([2.0, 2.0])}])
    got = hook.on_test_batch_end({"pred_scores": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(got["pred_scores"], [0.0, 0.5, 1.0])


def test_thresholds_settable_later_and_validated():
    hook = jaxnorm.MinMaxNormalizationHook()
    assert (hook.image_threshold, hook.pixel_threshold) == (0.5, 0.5)
    run_validation(hook, [{"pred_scores": np.array([0.0, 10.0])}])
    hook.image_threshold = jnp.float32(4.0)
    np.testing.assert_allclose(
        hook.on_test_batch_end({"pred_scores": np.array([4.0])})["pred_scores"], [0.5]
    )
    with pytest.raises(ValueError, match="image_threshold is nan"):
        hook.image_threshold = float("nan")
    with pytest.raises(ValueError, match="stats='both'"):
        jaxnorm.MinMaxNormalizationHook(stats="both")
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        jaxnorm.MinMaxNormalizationHook(nonfinite="ignore")


def test_bad_values_name_the_key():
    hook = jaxnorm.MinMaxNormalizationHook()
    with pytest.raises(ValueError, match="anomaly_maps: dtype <U1"):
        hook.on_validation_batch_end({"anomaly_maps": np.array(["a"])})
    with pytest.raises(ValueError, match="box_scores: expected a list"):
        hook.on_validation_batch_end({"box_scores": np.ones(3)})
    with pytest.raises(ValueError, match=r"box_scores\[1\]: expected a 1-D array"):
        hook.on_validation_batch_end({"box_scores": [np.ones(2), np.ones((2, 2))]})


def test_ragged_boxes_compile_logarithmically():
    rng = np.random.default_rng(3)
    hook = jaxnorm.MinMaxNormalizationHook(pixel_threshold=0.0)
    max_boxes, n_images = 64, 32
    batches = []
    for _ in range(200):
        counts = rng.integers(0, max_boxes + 1, size=n_images)
        batches.append(
            {
                "pred_scores": jnp.asarray(rng.normal(size=n_images), jnp.float32),
                "box_scores": [jnp.asarray(rng.normal(size=c), jnp.float32) for c in counts],
            }
        )
    with count_compiles() as log:
        run_validation(hook, batches)
        hook.on_test_start()
        outs = [hook.on_test_batch_end(b) for b in batches]
    largest = max(sum(len(x) for x in b["box_scores"]) for b in batches)
    # one fold and one normalize per bucket, one for the scores, and the odd scalar op
    budget = 2 * (int(np.log2(largest)) + 2)
    assert log.count <= budget, log.names
    lo, hi = reference.min_max(*[x for b in batches for x in b["box_scores"]])
    assert hook.host_stats()["pixel"] == (lo, hi)
    for raw, got in zip(batches, outs, strict=True):
        assert_normalized(got, raw, 0.5, 0.0, lo, hi)


def test_state_roundtrip_through_flax_serialization():
    hook = jaxnorm.MinMaxNormalizationHook(1.5, 0.25, stats="separate")
    run_validation(hook, [{"pred_scores": np.array([1.0, 3.0]), "anomaly_maps": np.ones((1, 3))}])
    data = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(hook.state_dict()))
    restored = jaxnorm.MinMaxNormalizationHook(stats="separate")
    restored.load_state_dict(flax.serialization.msgpack_restore(data))
    assert restored.host_stats() == hook.host_stats()
    assert (restored.image_threshold, restored.pixel_threshold) == (1.5, 0.25)
    # and through the typed target
    typed = flax.serialization.from_bytes(
        jaxnorm.MinMaxNormalizationHook().state_dict(),
        flax.serialization.to_bytes(hook.state_dict()),
    )
    again = jaxnorm.MinMaxNormalizationHook()
    again.load_state_dict(typed)
    assert again.host_stats() == hook.host_stats()


def test_json_roundtrip_with_anomalib_keys(tmp_path):
    hook = jaxnorm.MinMaxNormalizationHook(3.25, 0.5)
    run_validation(hook, [{"anomaly_maps": np.array([-1.0, 7.5])}])
    path = tmp_path / "stats.json"
    hook.to_json(path)
    meta = json.loads(path.read_text())
    assert meta == {"image_threshold": 3.25, "pixel_threshold": 0.5, "min": -1.0, "max": 7.5}
    loaded = jaxnorm.MinMaxNormalizationHook.from_json(path)
    assert loaded.host_stats() == hook.host_stats()
    x = {"pred_scores": np.array([0.0, 3.25, 9.0])}
    np.testing.assert_array_equal(
        loaded.on_test_batch_end(x)["pred_scores"], hook.on_test_batch_end(x)["pred_scores"]
    )
    # anomalib 0.x deployment metadata loads as is (extra keys ignored)
    anomalib_meta = {
        "image_threshold": 1.0,
        "pixel_threshold": 2.0,
        "min": 0.0,
        "max": 4.0,
        "task": "segmentation",
    }
    assert jaxnorm.MinMaxNormalizationHook.from_json(anomalib_meta).host_stats()["pixel"] == (
        0.0,
        4.0,
    )


def test_json_separate_and_empty():
    hook = jaxnorm.MinMaxNormalizationHook(stats="separate")
    meta = json.loads(hook.to_json())
    assert meta["pred_scores.min"] is None and meta["anomaly_maps.max"] is None
    loaded = jaxnorm.MinMaxNormalizationHook.from_json(json.dumps(meta))
    assert loaded.stats_mode == "separate"
    with pytest.raises(jaxnorm.StatisticsMissingError):
        loaded.on_test_start()
    with pytest.raises(ValueError, match="no 'min'/'max'"):
        jaxnorm.MinMaxNormalizationHook.from_json({"image_threshold": 1.0})


def test_functional_path_inside_user_jit_matches_hook():
    rng = np.random.default_rng(5)
    val = [batch(rng, boxes=False) for _ in range(3)]

    @jax.jit
    def eval_step(stats, outputs):
        return jaxnorm.update_stats(stats, outputs)

    stats = jaxnorm.NormalizationStats.empty()
    for b in val:
        stats = eval_step(stats, as_jax({k: v for k, v in b.items() if k != "label"}))
    hook = jaxnorm.MinMaxNormalizationHook(IMAGE_T, PIXEL_T)
    run_validation(hook, val)
    functional = jaxnorm.MinMaxNormalizationHook(IMAGE_T, PIXEL_T)
    functional.set_stats(stats)
    assert functional.host_stats() == hook.host_stats()

    raw = batch(rng)
    lo, hi = hook.host_stats()["image"]
    got = jax.jit(jaxnorm.normalize_outputs)(as_jax(raw), stats, IMAGE_T, PIXEL_T)
    assert_normalized(got, raw, IMAGE_T, PIXEL_T, lo, hi)


def test_validation_does_not_recompile_across_batches_of_one_shape():
    rng = np.random.default_rng(6)
    hook = jaxnorm.MinMaxNormalizationHook()
    run_validation(hook, [batch(rng, boxes=False)])
    with count_compiles() as log:
        run_validation(hook, [batch(rng, boxes=False) for _ in range(10)])
        hook.on_test_batch_end(batch(rng, boxes=False))
        hook.on_test_batch_end(batch(rng, boxes=False))
    # the two normalize shapes (scores, maps) compile once; nothing per batch
    assert log.count <= 2, log.names


def test_boxes_on_host_are_writable_numpy_equal_to_the_device_path():
    rng = np.random.default_rng(8)
    hook = jaxnorm.MinMaxNormalizationHook(IMAGE_T, PIXEL_T)
    run_validation(hook, [batch(rng)])
    raw = batch(rng)
    on_host = hook.normalize_batch(raw, boxes_on_host=True)["box_scores"]
    on_device = hook.normalize_batch(raw)["box_scores"]
    assert all(type(b) is np.ndarray and b.flags.writeable for b in on_host)
    for h, d in zip(on_host, on_device, strict=True):
        np.testing.assert_array_equal(h, np.asarray(d))


@pytest.mark.parametrize(
    "read",
    [
        lambda h: h.host_stats(),
        lambda h: h.state_dict(),
        lambda h: h.num_values,
        lambda h: h.on_test_start(),
        lambda h: h.on_test_batch_end({"pred_scores": np.array([1.0])}),
        lambda h: h.on_validation_epoch_start(),
    ],
    ids=["host_stats", "state_dict", "num_values", "test_start", "test_batch", "next_epoch"],
)
def test_nonfinite_error_surfaces_at_the_first_host_read_once(read):
    hook = jaxnorm.MinMaxNormalizationHook(accumulate=True)  # the next epoch keeps the stats
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"pred_scores": np.array([0.0, 2.0])})
    hook.on_validation_batch_end({"pred_scores": np.array([np.nan, 1.0])})
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="1 non-finite .* batch 1 of this"):
        read(hook)
    read(hook)  # reported once: the statistics stay usable
    assert hook.host_stats()["image"] == (0.0, 2.0)


def test_reducer_raises_at_epoch_end_with_the_summed_count():
    calls = []

    def reducer(mins, maxs, counts):  # as if another process saw 4 more non-finite values
        calls.append(counts.tolist())
        return np.minimum(mins, -1.0), np.maximum(maxs, 5.0), counts + np.array([10, 4])

    hook = jaxnorm.MinMaxNormalizationHook(reducer=reducer)
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"pred_scores": np.array([0.0, 2.0])})
    hook.on_validation_batch_end({"pred_scores": np.array([np.nan, np.inf, 1.0])})
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="6 non-finite .*'pred_scores'.*summed"):
        hook.on_validation_epoch_end()
    assert calls == [[2, 2]]
    assert hook.host_stats()["image"] == (-1.0, 5.0)

    def bad_reducer(mins, maxs, counts):
        return mins * np.nan, maxs, counts

    hook.reducer = bad_reducer
    with pytest.raises(ValueError, match="reducer output: 'image.min' is nan"):
        hook.on_validation_epoch_end()


# -- the positional normalize of the Lightning shim's steady path ------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16], ids=str)
def test_rowwise_normalize_stays_under_xlas_inline_mark_and_equals_the_plain_call(dtype):
    from jaxnorm._src import fused

    n, row = fused.INLINE_ROWS, fused.INLINE_ROW
    shapes = ((n,), (n, row - 1))
    same = (dtype, dtype)
    assert fused.runs_rowwise(shapes, same)
    assert not fused.runs_rowwise(((n,), (n, row)), same)  # one value more per row
    assert not fused.runs_rowwise(((n + 1,), (n + 1, 4)), same)  # more loop steps than pay
    assert not fused.runs_rowwise(((32,),), same[:1])  # inline as a whole already
    assert not fused.runs_rowwise(((8,), (4, 2)), same)  # rows that do not line up
    # XLA widens bfloat16 around the loop, over whole arrays: no gain.
    assert not fused.runs_rowwise(shapes, (dtype, jnp.bfloat16))
    keys = ("pred_scores", "anomaly_maps")
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    table = np.array([[0.3, -1.0, 2.0], [0.1, -2.0, 1.5]], np.float32)
    params = jax.device_put(table, cpu)
    xs = [jax.device_put(rng.normal(size=s).astype(dtype), cpu) for s in shapes]
    rowwise = fused.normalize_positional(keys, True)
    plain = fused.normalize_positional(keys, False)
    for x, a, b, (t, lo, hi) in zip(
        xs, rowwise(params, *xs), plain(params, *xs), table, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        want = reference.normalize(np.asarray(x, np.float64), t, lo, hi)
        np.testing.assert_allclose(
            np.asarray(a, np.float64), want, atol=1e-6 if dtype == jnp.float32 else 1e-2
        )

    def flops(fn):
        cost = fn.lower(params, *xs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if not cost or "flops" not in cost:
            pytest.skip("this jaxlib's compiled executables report no cost analysis")
        return cost["flops"]

    # XLA's CPU client runs executables under 1000 flops in the calling thread.
    assert flops(rowwise) < 1000 <= flops(plain)
