"""``MinMaxNormalizationHook(thresholds="f1")``: anomalib's F1 adaptive thresholds computed
during validation, from anomalib 0.x's output keys.

Thresholds are compared with the numpy reference of anomalib 2.7's metric
(tests/f1_reference.py, written from SPEC.md section 10) over everything the epoch saw, as
float32, bit for bit. The per-batch work is counted: one call of the hook's jitted fold per
batch, no separate F1 dispatch, no recompile in a second epoch, and no host read (a slow
producer is still running when the hook returns).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm._src import f1_curve, f1_fold, fold
from jaxnorm.testing import count_compiles
from tests import f1_reference as ref
from tests import slow_producer


def make_batch(rng, n, *, side=8, masks=True, labels=True, channel=True):
    """A validation batch as anomalib's outputs: anomalous images score higher."""
    label = np.arange(n) % 3 == 0
    maps = rng.normal(size=(n, 1, side, side)).astype(np.float32)
    mask = rng.random((n, side, side)) < 0.15
    maps += 1.5 * mask[:, None] + 0.5 * label[:, None, None, None]
    out = {"pred_scores": maps.reshape(n, -1).max(axis=1), "anomaly_maps": maps}
    if not channel:
        out["anomaly_maps"] = maps[:, 0]
    if labels:
        out["label"] = label
    if masks:
        out["mask"] = mask
    return out


def epoch_batches(seed, sizes=(8, 8, 5), **kwargs):
    rng = np.random.default_rng(seed)
    return [make_batch(rng, n, **kwargs) for n in sizes]


def validate(hook, batches):
    hook.on_validation_epoch_start()
    for b in batches:
        hook.on_validation_batch_end(b)
    hook.on_validation_epoch_end()


def want(batches, score, label):
    s = np.concatenate([np.ravel(b[score]) for b in batches])
    y = np.concatenate([np.ravel(b[label]) for b in batches])
    return ref.f1_threshold(s, y)


def assert_f32_equal(got: float, expected) -> None:
    assert np.float32(got).view(np.uint32) == np.float32(expected).view(np.uint32), (got, expected)


@pytest.mark.parametrize("stats", ["shared", "separate"])
@pytest.mark.parametrize("to", ["numpy", "jax"])
def test_thresholds_equal_anomalibs_over_the_epoch(stats, to):
    """Odd batch sizes (padded to their bucket) and two epochs: each epoch starts over."""
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", stats=stats)
    for seed in (1, 2):
        batches = epoch_batches(seed)
        put = (lambda b: b) if to == "numpy" else (lambda b: jax.tree.map(jnp.asarray, b))
        validate(hook, [put(b) for b in batches])
        assert_f32_equal(hook.image_threshold, want(batches, "pred_scores", "label"))
        assert_f32_equal(hook.pixel_threshold, want(batches, "anomaly_maps", "mask"))
    # the statistics are the hook's as ever
    maps = np.concatenate([b["anomaly_maps"].ravel() for b in batches])
    assert hook.host_stats()["pixel"] == (float(maps.min()), float(maps.max()))


@pytest.mark.parametrize(
    "kind", ["int labels", "float labels", "maps without a channel", "masks with one"]
)
def test_label_dtypes_and_map_layouts(kind):
    batches = epoch_batches(3, channel=kind != "maps without a channel")
    for b in batches:
        if kind == "int labels":
            b["label"], b["mask"] = b["label"].astype(np.int32), b["mask"].astype(np.uint8)
        elif kind == "float labels":
            b["label"], b["mask"] = b["label"].astype(np.float32), b["mask"].astype(np.float32)
        elif kind == "masks with one":
            b["mask"] = b["mask"][:, None]
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", stats="separate")
    validate(hook, batches)
    assert_f32_equal(hook.image_threshold, want(batches, "pred_scores", "label"))
    assert_f32_equal(hook.pixel_threshold, want(batches, "anomaly_maps", "mask"))


def test_without_masks_the_pixel_threshold_is_the_image_one_as_anomalib_07(caplog):
    batches = epoch_batches(4, masks=False)
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1")
    with caplog.at_level(logging.INFO, logger="jaxnorm"):
        validate(hook, batches)
    image = want(batches, "pred_scores", "label")
    assert_f32_equal(hook.image_threshold, image)
    assert hook.pixel_threshold == hook.image_threshold
    assert "no validation batch had both 'anomaly_maps' and 'mask'" in caplog.text


def test_default_leaves_the_thresholds_alone():
    hook = jaxnorm.MinMaxNormalizationHook(0.7, 0.2)
    validate(hook, epoch_batches(5))
    assert (hook.image_threshold, hook.pixel_threshold) == (0.7, 0.2)
    with pytest.raises(ValueError, match=r"thresholds='adaptive'.*None.*'f1'"):
        jaxnorm.MinMaxNormalizationHook(thresholds="adaptive")


def test_one_class_epochs_fall_back_as_anomalib(caplog):
    batches = epoch_batches(6)
    for b in batches:
        b["label"][:] = False
        b["mask"][:] = False
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1")
    with caplog.at_level(logging.WARNING, logger="jaxnorm"):
        validate(hook, batches)
    maps = np.concatenate([b["anomaly_maps"].ravel() for b in batches])
    scores = np.concatenate([b["pred_scores"] for b in batches])
    assert hook.image_threshold == scores.max() and hook.pixel_threshold == maps.max()
    assert "no label equals 1" in caplog.text


@pytest.mark.parametrize(
    "change, match",
    [
        ("no label", r"without 'label' \(keys: \['anomaly_maps', 'mask', 'pred_scores'\]\)"),
        ("no scores", r"without 'pred_scores'.*each map's max"),
        ("label shape", r"'label' has shape \(4,\) but 'pred_scores' has shape \(8,\)"),
        ("mask shape", r"'mask' has shape \(8, 4, 8\) but 'anomaly_maps' has shape"),
        ("label axis", r"'label' has shape \(1, 8\).*same batch axis"),
        ("mask gone", r"batch 1 of this epoch has not both 'anomaly_maps' and 'mask'"),
        ("mask late", r"batch 1 of this epoch has both .* while the earlier batches had not"),
        ("label not numeric", r"label: dtype <U1 .* not a real number type"),
    ],
)
def test_bad_batches_are_named_and_lose_nothing(change, match):
    rng = np.random.default_rng(7)
    first, bad = make_batch(rng, 8, masks=change != "mask late"), make_batch(rng, 8)
    if change == "no label":
        del bad["label"]
    elif change == "no scores":
        del bad["pred_scores"]
    elif change == "label shape":
        bad["label"] = bad["label"][:4]
    elif change == "mask shape":
        bad["mask"] = bad["mask"][:, :4]
    elif change == "label axis":
        bad["label"] = bad["label"][None]
    elif change == "mask gone":
        del bad["mask"]
    elif change == "label not numeric":
        bad["label"] = np.array(list("abcdefgh"))
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", stats="separate")
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end(first)
    with pytest.raises(ValueError, match=match):
        hook.on_validation_batch_end(bad)
    hook.on_validation_epoch_end()  # the first batch alone, as if the bad one was never given
    assert_f32_equal(hook.image_threshold, want([first], "pred_scores", "label"))
    scores = first["pred_scores"]
    assert hook.host_stats()["image"] == (float(scores.min()), float(scores.max()))


def test_labels_other_than_0_and_1_are_named_at_epoch_end():
    """A 0/255 mask would have no anomalous pixel: the pixel threshold is not computed."""
    batches = epoch_batches(8)
    for b in batches:
        b["mask"] = b["mask"].astype(np.uint8) * 255
    hook = jaxnorm.MinMaxNormalizationHook(0.5, 0.25, thresholds="f1", stats="separate")
    with pytest.raises(ValueError, match=r"'mask' held \d+ value\(s\) other than 0 and 1"):
        validate(hook, batches)
    assert_f32_equal(hook.image_threshold, want(batches, "pred_scores", "label"))
    assert hook.pixel_threshold == 0.25


@pytest.mark.parametrize("nonfinite", ["raise", "omit"])
def test_nonfinite_scores(nonfinite):
    """ "raise": the batch is left out of the thresholds too, which are set from the clean
    batches before the error; "omit": the values are left out. The maps are large enough
    for the bin counts to decide (not a sort of every stored score)."""
    batches = epoch_batches(9, side=64)
    assert sum(b["anomaly_maps"].size for b in batches) > f1_curve.SORT_BELOW
    batches[1]["pred_scores"][2] = np.nan  # read by the image threshold alone (shared stats)
    batches[1]["mask"][:4] = True  # a batch that would move the pixel threshold, were it kept
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", nonfinite=nonfinite)
    if nonfinite == "raise":
        with pytest.raises(jaxnorm.NonFiniteScoresError, match=r"1 non-finite .*'pred_scores'"):
            validate(hook, batches)
        kept = [batches[0], batches[2]]
        assert_f32_equal(hook.image_threshold, want(kept, "pred_scores", "label"))
        assert_f32_equal(hook.pixel_threshold, want(kept, "anomaly_maps", "mask"))
        return
    validate(hook, batches)
    s = np.concatenate([b["pred_scores"] for b in batches])
    y = np.concatenate([b["label"] for b in batches])
    assert_f32_equal(hook.image_threshold, ref.f1_threshold(s[np.isfinite(s)], y[np.isfinite(s)]))
    assert_f32_equal(hook.pixel_threshold, want(batches, "anomaly_maps", "mask"))


def test_accumulated_statistics_keep_per_epoch_thresholds_as_anomalib_0x():
    first, second = epoch_batches(10), epoch_batches(11)
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", accumulate=True)
    validate(hook, first)
    validate(hook, second)
    assert_f32_equal(hook.image_threshold, want(second, "pred_scores", "label"))
    maps = np.concatenate([b["anomaly_maps"].ravel() for b in first + second])
    assert hook.host_stats()["pixel"] == (float(maps.min()), float(maps.max()))


def test_thresholds_persist_as_before(tmp_path):
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1")
    validate(hook, epoch_batches(12))
    restored = jaxnorm.MinMaxNormalizationHook()
    restored.load_state_dict(hook.state_dict())
    assert (restored.image_threshold, restored.pixel_threshold) == (
        hook.image_threshold,
        hook.pixel_threshold,
    )
    again = jaxnorm.MinMaxNormalizationHook.from_json(hook.to_json())
    assert again.image_threshold == hook.image_threshold


def test_a_reducer_sees_the_counts_and_the_threshold_is_the_unions():
    """In one process: a reducer that doubles every sum stands for a second process with the
    same data, whose union has the same threshold; the calls it gets are collectives (the
    same on every process)."""
    calls = []

    def twice(mins, maxs, counts):
        calls.append(np.asarray(counts).size)
        return np.asarray(mins), np.asarray(maxs), 2 * np.asarray(counts, np.int64)

    batches = epoch_batches(13, sizes=(64, 64))
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", reducer=twice)
    validate(hook, batches)
    assert_f32_equal(hook.image_threshold, want(batches + batches, "pred_scores", "label"))
    assert_f32_equal(hook.pixel_threshold, want(batches + batches, "anomaly_maps", "mask"))
    assert calls[:2] == [2, 6]  # the statistics, then the F1 batch and label counts


# -- one dispatch per batch, no recompile, no host read ---------------------------------------


def test_one_jitted_fold_per_batch_and_no_recompile(monkeypatch):
    calls = {"fold": 0, "f1 eager": 0}
    real_fold, real_f1 = fold.fold, f1_fold.fold

    def counted_fold(*args, **kwargs):
        calls["fold"] += 1
        return real_fold(*args, **kwargs)

    def counted_f1(fixed, scores, *args, **kwargs):
        # Called while the hook's fold is traced (tracers) and never on its own.
        if not isinstance(scores, jax.core.Tracer):
            calls["f1 eager"] += 1
        return real_f1(fixed, scores, *args, **kwargs)

    monkeypatch.setattr(fold, "fold", counted_fold)
    monkeypatch.setattr(f1_fold, "fold", counted_f1)
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1")
    validate(hook, epoch_batches(14))
    assert calls == {"fold": 3, "f1 eager": 0}
    with count_compiles() as log:
        validate(hook, epoch_batches(15))  # same layout, other values: nothing compiles
    assert log.count == 0, log.names
    assert calls == {"fold": 6, "f1 eager": 0}


N = 12


def _produce(seed, poison, steps):
    """A slow stand-in for a model: outputs, labels and masks all come from it."""
    m = jax.random.normal(jax.random.key(seed), (384, 384), jnp.float32) / 20
    m = lax.fori_loop(0, steps, lambda i, m: jnp.tanh(m @ m + 0.1), m)
    flat = m.reshape(-1)
    maps = flat[: N * 64].reshape(N, 1, 8, 8)
    del poison
    return {
        "pred_scores": flat[-N:] + 1.0,
        "anomaly_maps": maps,
        "label": flat[-N:] > 0,
        "mask": maps[:, 0] > 0.05,
    }


def test_validation_batch_returns_before_the_producer_finishes():
    produce = slow_producer.calibrated(_produce)
    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", stats="separate")
    validate(hook, [jax.block_until_ready(produce(100))])  # compiles every call
    hook.on_validation_epoch_start()
    batches = [produce(1), produce(2)]
    for outputs in batches:
        hook.on_validation_batch_end(outputs)
        assert not any(v.is_ready() for v in outputs.values())
    hook.on_validation_epoch_end()
    host = [jax.tree.map(np.asarray, b) for b in batches]
    assert_f32_equal(hook.pixel_threshold, want(host, "anomaly_maps", "mask"))


@pytest.mark.parametrize(
    "mesh_shape, spec",
    [((8,), P("data")), ((4, 2), P("data", None, "model"))],
    ids=["8dev", "4x2dev"],
)
def test_sharded_batches_give_the_thresholds_of_the_whole_batch(devices, mesh_shape, spec):
    mesh = jax.make_mesh(mesh_shape, ("data", "model")[: len(mesh_shape)], devices=devices)
    batches = epoch_batches(16, sizes=(16, 16))

    def put(b):
        return {
            "anomaly_maps": jax.device_put(b["anomaly_maps"], NamedSharding(mesh, spec)),
            "pred_scores": jax.device_put(b["pred_scores"], NamedSharding(mesh, P("data"))),
            "label": jax.device_put(b["label"], NamedSharding(mesh, P("data"))),
            "mask": jax.device_put(b["mask"], NamedSharding(mesh, P("data"))),
        }

    hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1", stats="separate")
    validate(hook, [put(b) for b in batches])
    assert_f32_equal(hook.image_threshold, want(batches, "pred_scores", "label"))
    assert_f32_equal(hook.pixel_threshold, want(batches, "anomaly_maps", "mask"))
