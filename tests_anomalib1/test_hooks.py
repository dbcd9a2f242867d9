"""The callback's hooks driven by hand on a stand-in module (no training): the per-batch
paths (one fold per validation batch, one import and one export per test batch, no host read,
no recompile) and the statistics and outputs against a numpy reference of anomalib 1.x's
callback (SPEC §9), for the installed design."""

from __future__ import annotations

import types
import warnings

import common
import numpy as np
import pytest
import torch

import torch_compat._change
from jaxnorm.testing import count_compiles
from torch_compat import _dlpack
from torch_compat.anomalib1 import BoxScoresWarning, MinMaxNormalizationCallback

IMAGE_T, PIXEL_T = 0.25, 0.75


def module():
    """What the callback reads of an ``AnomalyModule``: thresholds and metrics (none here)."""
    threshold = types.SimpleNamespace
    return types.SimpleNamespace(
        image_threshold=threshold(value=torch.tensor(IMAGE_T)),
        pixel_threshold=threshold(value=torch.tensor(PIXEL_T)),
        image_metrics=None,
        pixel_metrics=None,
    )


def outputs(seed, n=4, lo=-1.0, hi=2.0):
    g = torch.Generator().manual_seed(seed)
    maps = lo + (hi - lo) * torch.rand(n, 1, 8, 8, generator=g)
    return {"anomaly_maps": maps, "pred_scores": maps.amax(dim=(1, 2, 3)) - 0.5}


def reference_stats(batches):
    """anomalib's statistics of these validation batches, in numpy."""
    maps = np.concatenate([b["anomaly_maps"].numpy().ravel() for b in batches])
    scores = np.concatenate([b["pred_scores"].numpy().ravel() for b in batches])
    if common.expected_design() == "per-output":
        return {
            "anomaly_maps": (float(maps.min()), float(maps.max())),
            "box_scores": (np.inf, -np.inf),
            "pred_scores": (float(scores.min()), float(scores.max())),
        }
    return {"": (float(maps.min()), float(maps.max()))}  # maps first: one shared statistic


def reference_normalize(x, threshold, lo, hi):
    """anomalib 1.x's ``normalize`` in float64 numpy: clip((x - t) / (max - min) + 0.5)."""
    return np.clip((np.float64(x) - threshold) / (hi - lo) + 0.5, 0, 1)


def _spy(monkeypatch, counts, name, real):
    def call(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_dlpack, name, call)


def _no_host_read(*args, **kwargs):
    raise AssertionError("host read of a tensor in a per-batch hook")


def _forbid_host_reads(monkeypatch):
    # As on an accelerator, where a read waits for the device: the shared hooks key CPU
    # thresholds and statistics by value (a read costs nothing there), others by identity
    # and version.
    monkeypatch.setattr(torch_compat._change, "on_host", lambda t: False)
    for name in ("item", "tolist", "numpy", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, _no_host_read)


def test_steady_batches_fold_and_normalize_once_without_host_reads(monkeypatch):
    cb, pl = MinMaxNormalizationCallback(), module()
    cb.setup(None, pl, "fit")
    val = [outputs(i) for i in range(6)]
    counts = {"import_batch": 0, "export_batch": 0}
    cb.on_validation_epoch_start(None, pl)
    cb.on_validation_batch_end(None, pl, val[0], None, 0)  # the full path leaves a plan
    cb.on_validation_batch_end(None, pl, val[1], None, 1)
    with monkeypatch.context() as m:
        _spy(m, counts, "import_batch", _dlpack.import_batch)
        _forbid_host_reads(m)
        with count_compiles() as log:
            for i, b in enumerate(val[2:]):
                cb.on_validation_batch_end(None, pl, b, None, i + 2)
    assert counts["import_batch"] == 4 and log.count == 0, (counts, log.names)
    cb.on_validation_epoch_end(None, pl)
    want = reference_stats(val)
    assert common.stats(pl.normalization_metrics) == want

    cb.on_test_start(None, pl)
    test = [outputs(100 + i, lo=-3.0, hi=4.0) for i in range(5)]
    raw = [{k: v.clone() for k, v in b.items()} for b in test]
    with monkeypatch.context() as m:
        m.setattr(torch_compat._change, "on_host", lambda t: False)
        cb.on_test_batch_end(None, pl, test[0], None, 0)  # reads the thresholds, compiles
    counts = {"import_batch": 0, "export_batch": 0}
    with monkeypatch.context() as m:
        _spy(m, counts, "import_batch", _dlpack.import_batch)
        _spy(m, counts, "export_batch", _dlpack.export_batch)
        _forbid_host_reads(m)
        with count_compiles() as log:
            for i, b in enumerate(test[1:]):
                cb.on_test_batch_end(None, pl, b, None, i + 1)
    assert counts == {"import_batch": 4, "export_batch": 4} and log.count == 0, (counts, log)
    image = want["pred_scores"] if "pred_scores" in want else want[""]
    pixel = want["anomaly_maps"] if "anomaly_maps" in want else want[""]
    for got, x in zip(test, raw, strict=True):
        for key, t, (lo, hi) in (
            ("pred_scores", IMAGE_T, image),
            ("anomaly_maps", PIXEL_T, pixel),
        ):
            expected = reference_normalize(x[key].numpy(), t, lo, hi)
            assert got[key].dtype == torch.float32 and got[key].shape == x[key].shape
            np.testing.assert_allclose(got[key].numpy(), expected, rtol=0, atol=1.2e-7)


def test_the_statistics_reset_or_accumulate_as_the_design_says():
    cb, pl = MinMaxNormalizationCallback(), module()
    cb.setup(None, pl, "fit")
    epochs = [[outputs(1, lo=-5.0, hi=9.0)], [outputs(2, lo=0.0, hi=1.0)]]
    for batches in epochs:
        cb.on_validation_epoch_start(None, pl)
        for i, b in enumerate(batches):
            cb.on_validation_batch_end(None, pl, b, None, i)
        cb.on_validation_epoch_end(None, pl)
    got = common.stats(pl.normalization_metrics)
    if common.expected_design() == "per-output":
        assert got == reference_stats(epochs[1])  # reset at each validation epoch start
    else:
        assert got == reference_stats(epochs[0] + epochs[1])  # never reset


def test_box_scores_are_normalized_as_anomalibs():
    cb, pl = MinMaxNormalizationCallback(), module()
    cb.setup(None, pl, "fit")
    val = [outputs(i) for i in range(2)]
    cb.on_validation_epoch_start(None, pl)
    for i, b in enumerate(val):
        cb.on_validation_batch_end(None, pl, b, None, i)
    cb.on_validation_epoch_end(None, pl)
    cb.on_test_start(None, pl)
    boxes = [torch.tensor([0.5, 1.5, 2.5]), torch.zeros(0), torch.tensor([-0.25])]
    batch = {**outputs(7), "box_scores": [b.clone() for b in boxes]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.on_test_batch_end(None, pl, batch, None, 0)
        cb.on_predict_batch_end(None, pl, {**outputs(8), "box_scores": boxes}, None, 0)
    warned = [w for w in caught if issubclass(w.category, BoxScoresWarning)]
    for got, x in zip(batch["box_scores"], boxes, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape
        if common.expected_design() == "per-output":
            # anomalib: (x - t) / (-inf - inf) + 0.5, the box statistics never filled
            assert torch.equal(got, torch.full_like(x, 0.5))
        else:
            lo, hi = reference_stats(val)[""]
            np.testing.assert_allclose(
                got.numpy(), reference_normalize(x.numpy(), PIXEL_T, lo, hi), rtol=0, atol=1.2e-7
            )
    assert len(warned) == (common.expected_design() == "per-output"), caught


@pytest.mark.parametrize("kind", common.KINDS)
def test_validation_box_scores_feed_the_statistics_as_anomalibs(kind):
    """A detector's validation outputs hold box scores (none of anomalib's image models'
    do): per output they get statistics of their own, shared they feed the one statistic
    when no maps come first. anomalib's own callback runs the same checks."""
    cb, pl = common.callback(kind), module()
    cb.setup(None, pl, "fit")
    with_maps = {**outputs(3), "box_scores": [torch.tensor([4.0, -2.0]), torch.zeros(0)]}
    boxes_only = {"box_scores": [torch.tensor([7.5]), torch.tensor([0.5, 1.0])]}
    cb.on_validation_epoch_start(None, pl)
    cb.on_validation_batch_end(None, pl, with_maps, None, 0)
    cb.on_validation_batch_end(None, pl, boxes_only, None, 1)
    cb.on_validation_epoch_end(None, pl)
    maps, scores = with_maps["anomaly_maps"].numpy(), with_maps["pred_scores"].numpy()
    boxes = [4.0, -2.0, 7.5, 0.5, 1.0]
    if common.expected_design() == "per-output":
        want = {
            "anomaly_maps": (float(maps.min()), float(maps.max())),
            "box_scores": (min(boxes), max(boxes)),
            "pred_scores": (float(scores.min()), float(scores.max())),
        }
        box_stats = want["box_scores"]
    else:  # maps, else boxes, else scores: the maps of the first batch, the boxes of the second
        values = np.concatenate([maps.ravel(), [7.5, 0.5, 1.0]])
        want = {"": (float(values.min()), float(values.max()))}
        box_stats = want[""]
    assert common.stats(pl.normalization_metrics) == want
    cb.on_test_start(None, pl)
    test_boxes = [torch.tensor([3.0, -1.0, 9.0]), torch.zeros(0)]
    batch = {**outputs(4), "box_scores": [b.clone() for b in test_boxes]}
    cb.on_test_batch_end(None, pl, batch, None, 0)  # no warning: filterwarnings makes it fail
    for got, x in zip(batch["box_scores"], test_boxes, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape, (got, x)
        expected = reference_normalize(x.numpy(), PIXEL_T, *box_stats)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1.2e-7)


@pytest.mark.skipif(common.expected_design() != "per-output", reason="box statistics: 1.1.1+")
def test_box_statistics_written_or_broken_after_a_batch_are_seen():
    """The box path keys what its hook holds by the values read at each batch: an in-place
    write is used at the next batch, and unusable statistics are named, not used."""
    cb, pl = MinMaxNormalizationCallback(), module()
    cb.setup(None, pl, "fit")
    cb.on_validation_epoch_start(None, pl)
    cb.on_validation_batch_end(None, pl, {**outputs(1), "box_scores": [torch.ones(2)]}, None, 0)
    cb.on_validation_epoch_end(None, pl)
    cb.on_test_start(None, pl)
    box = pl.normalization_metrics["box_scores"]
    x = torch.tensor([0.0, 1.0, 2.0])
    for lo, hi in ((0.5, 1.5), (-4.0, 4.0)):
        box.min.fill_(lo), box.max.fill_(hi)  # in place, as a loaded checkpoint writes them
        batch = {**outputs(2), "box_scores": [x.clone()]}
        cb.on_test_batch_end(None, pl, batch, None, 0)
        want = reference_normalize(x.numpy(), PIXEL_T, lo, hi)
        np.testing.assert_allclose(batch["box_scores"][0].numpy(), want, rtol=0, atol=1.2e-7)
    box.max.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"normalization_metrics\.box_scores\.max"):
        cb.on_test_batch_end(None, pl, {**outputs(3), "box_scores": [x.clone()]}, None, 0)
