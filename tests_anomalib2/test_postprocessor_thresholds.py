"""torch_compat.anomalib2.PostProcessor's F1 thresholds (jaxnorm's) against anomalib 2.7.0's.

Validation folds the F1 states in the same jaxnorm dispatch as the min/max; at validation
epoch end the thresholds go into ``_image_threshold``/``_pixel_threshold``. Each test drives
both classes with the same batches and compares the buffers bit for bit (float32); anomalib's
own ``F1AdaptiveThreshold`` metrics are counted on ours: never updated, never computed.
"""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import F1AdaptiveThreshold
from anomalib.post_processing import PostProcessor as AnomalibPostProcessor
from common import BUFFERS

from jaxnorm._src import f1_curve
from jaxnorm.testing import count_compiles
from tests import f1_reference
from torch_compat import _dlpack
from torch_compat.anomalib2 import PostProcessor


def val_batch(seed, n=4, size=8, *, scale=3.0, labels=True, masks=True):
    """Image scores and maps where anomalous images and pixels score higher."""
    g = torch.Generator().manual_seed(seed)
    label = torch.tensor([i % 2 == 1 for i in range(n)])
    mask = torch.rand(n, size, size, generator=g) > 0.8
    amap = torch.randn(n, size, size, generator=g) * scale + 2.0 * mask
    return dict(
        image=torch.zeros(n, 3, size, size),
        gt_label=label if labels else None,
        gt_mask=mask if masks else None,
        pred_score=amap.flatten(1).amax(1) + label.float(),
        anomaly_map=amap,
    )


def image_batch(fields):
    return ImageBatch(**{k: (v.clone() if v is not None else None) for k, v in fields.items()})


def raw_batch(fields):
    """The fields as they are (ImageBatch makes scores float32 and labels bool)."""
    return types.SimpleNamespace(pred_label=None, pred_mask=None, **fields)


def validate(pp, batches, make=image_batch):
    for b in batches:
        pp.on_validation_batch_end(None, None, make(b))
    pp.on_validation_epoch_end(None, None)


def buffers(pp):
    return {name: getattr(pp, name).clone() for name in BUFFERS}


def assert_same_buffers(ours, theirs):
    for name in BUFFERS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype, name
        same = torch.equal(a, b) or (a.isnan().item() and b.isnan().item())
        assert same, (name, a.item(), b.item())


@pytest.fixture
def metric_calls(monkeypatch):
    """Calls of anomalib's ``F1AdaptiveThreshold.update``/``compute``, per instance."""
    calls = {}
    for method in ("update", "compute"):
        real = getattr(F1AdaptiveThreshold, method)

        def spy(self, *args, _real=real, _method=method, **kwargs):
            calls[(id(self), _method)] = calls.get((id(self), _method), 0) + 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(F1AdaptiveThreshold, method, spy)

    def of(pp):
        metrics = (pp._image_threshold_metric, pp._pixel_threshold_metric)
        return sum(calls.get((id(m), k), 0) for m in metrics for k in ("update", "compute"))

    return of


def test_thresholds_equal_anomalibs_and_anomalibs_metrics_never_run(metric_calls):
    """Three epochs (each starts over, as anomalib's reset metrics do), an odd batch size."""
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    for epoch in range(3):
        batches = [val_batch(10 * epoch + i, n=5 if i == 2 else 4) for i in range(3)]
        validate(ours, batches)
        validate(theirs, batches)
        assert_same_buffers(ours, theirs)
        # and against numpy, from SPEC.md: the threshold of everything the epoch saw
        maps = np.concatenate([b["anomaly_map"].numpy().ravel() for b in batches])
        masks = np.concatenate([b["gt_mask"].numpy().ravel() for b in batches])
        assert ours._pixel_threshold.item() == f1_reference.f1_threshold(maps, masks)
    assert metric_calls(theirs) > 0  # the spy sees anomalib's metrics where they run
    assert metric_calls(ours) == 0  # ours: jaxnorm's F1, anomalib's metrics untouched
    assert not ours._pixel_threshold_metric.update_called
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the same buffers, no more


def test_a_large_pixel_set_takes_the_bins_and_stays_anomalibs():
    """Past the size where every stored score is sorted: bin counts, then candidates."""
    batches = [val_batch(40 + i, n=16, size=64) for i in range(3)]
    assert sum(b["anomaly_map"].numel() for b in batches) > f1_curve.SORT_BELOW
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    validate(ours, batches)
    validate(theirs, batches)
    assert_same_buffers(ours, theirs)


@pytest.mark.parametrize(
    "case",
    [
        "normal only",
        "anomalous only",
        "no masks",
        "labels in some batches",
        "ties",
        "float16 scores",
        "bfloat16 scores",
        "int labels",
        "float labels",
        "labels other than 0 and 1",
        "negative and tiny scores",
        "thresholding off",
        "normalization off",
    ],
)
def test_edge_sets_equal_anomalibs(case, caplog):
    batches = [val_batch(60 + i) for i in range(3)]
    kwargs, make = {}, image_batch
    if case == "normal only":
        for b in batches:
            b["gt_label"][:] = False
            b["gt_mask"][:] = False
    elif case == "anomalous only":
        for b in batches:
            b["gt_label"][:] = True
            b["gt_mask"][:] = True
    elif case == "no masks":
        for b in batches:
            b["gt_mask"] = None
    elif case == "labels in some batches":
        batches[0]["gt_label"] = batches[0]["gt_mask"] = None
        batches[2]["gt_mask"] = None
    elif case == "ties":
        for b in batches:
            b["anomaly_map"] = torch.round(b["anomaly_map"])
            b["pred_score"] = torch.round(b["pred_score"])
    elif case in ("float16 scores", "bfloat16 scores"):
        dtype = torch.float16 if case == "float16 scores" else torch.bfloat16
        for b in batches:
            b["anomaly_map"] = b["anomaly_map"].to(dtype)
            b["pred_score"] = b["pred_score"].to(dtype)
        make = raw_batch  # ImageBatch would make them float32
    elif case == "int labels":
        for b in batches:
            b["gt_label"] = b["gt_label"].long()
            b["gt_mask"] = b["gt_mask"].to(torch.int32)
        make = raw_batch
    elif case == "float labels":
        for b in batches:
            b["gt_label"] = b["gt_label"].double()
            b["gt_mask"] = b["gt_mask"].float()
        make = raw_batch
    elif case == "labels other than 0 and 1":  # anomalib counts them as normal; so do we
        for b in batches:
            b["gt_label"] = b["gt_label"].long() + torch.tensor([2, 0, 0, 0])
            b["gt_mask"] = b["gt_mask"].to(torch.uint8) * 255
        make = raw_batch
    elif case == "negative and tiny scores":
        for b in batches:
            b["anomaly_map"] = -b["anomaly_map"] * 1e-38
            b["pred_score"] = -b["pred_score"] * 1e-30
    elif case == "thresholding off":
        kwargs = {"enable_thresholding": False}
    elif case == "normalization off":
        kwargs = {"enable_normalization": False}
    ours, theirs = PostProcessor(**kwargs), AnomalibPostProcessor(**kwargs)
    with caplog.at_level(logging.WARNING):
        validate(theirs, batches, make)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        caplog.clear()
        validate(ours, batches, make)
    assert_same_buffers(ours, theirs)
    if case in ("normal only", "anomalous only"):  # anomalib warns; so does jaxnorm
        assert warned
        assert [r for r in caplog.records if r.name == "jaxnorm" and r.levelno == logging.WARNING]
    if case == "no masks":
        assert math.isnan(ours._pixel_threshold.item())  # anomalib 2: not set
    if case == "thresholding off":
        assert math.isnan(ours._image_threshold.item())


def test_steady_validation_with_thresholds_imports_once_and_folds_once(monkeypatch):
    """One import call (scores, maps, labels and masks together) and one jitted fold per
    steady batch, no recompile; labels cross as bool tensors, zero-copy."""
    pp = PostProcessor()
    hook = pp.__dict__["_jaxnorm"].hook
    counts = {"full": 0, "imports": 0, "tensors": 0}

    def full(*args, _real=hook.adapter.fold_outputs, **kwargs):
        counts["full"] += 1
        return _real(*args, **kwargs)

    def imports(tensors, *args, _real=_dlpack.import_batch, **kwargs):
        counts["imports"] += 1
        counts["tensors"] += len(tensors)
        return _real(tensors, *args, **kwargs)

    monkeypatch.setattr(hook.adapter, "fold_outputs", full)
    monkeypatch.setattr(_dlpack, "import_batch", imports)
    batches = [val_batch(80 + i, n=6) for i in range(5)]
    with count_compiles() as log:
        pp.on_validation_batch_end(None, None, image_batch(batches[0]))
        pp.on_validation_batch_end(None, None, image_batch(batches[1]))
        settled = log.count
        for b in batches[2:]:
            pp.on_validation_batch_end(None, None, image_batch(b))
    assert counts == {"full": 1, "imports": 4, "tensors": 16}, counts
    assert log.count == settled, log.names
    pp.on_validation_epoch_end(None, None)
    theirs = AnomalibPostProcessor()
    validate(theirs, batches)
    assert_same_buffers(pp, theirs)


def test_scores_written_in_place_after_the_hook_keep_the_thresholds_as_handed_over():
    """The F1 state keeps its own copy of each batch's scores (anomalib keeps the tensors)."""
    batches = [val_batch(90 + i, n=8, size=32) for i in range(4)]
    maps, scores = torch.empty(8, 32, 32), torch.empty(8)
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    for b in batches:
        maps.copy_(b["anomaly_map"])
        scores.copy_(b["pred_score"])
        fields = {**b, "anomaly_map": maps, "pred_score": scores}
        ours.on_validation_batch_end(None, None, raw_batch(fields))
        maps.fill_(1e6)  # the caller's next write
        scores.fill_(-1e6)
    ours.on_validation_epoch_end(None, None)
    validate(theirs, batches)
    assert_same_buffers(ours, theirs)


@pytest.mark.parametrize(
    "change, match",
    [
        ("mask shape", r"batch.gt_mask has shape \(4, 8, 4\) but batch.anomaly_map"),
        ("label count", r"batch.gt_label has shape \(2,\) but batch.pred_score"),
        ("label axis", r"batch.gt_label has shape \(1, 4\) .* same batch axis"),
        ("complex labels", r"batch.gt_label: expected a tensor of real labels"),
    ],
)
def test_labels_that_are_not_one_per_score_are_named_at_the_batch(change, match):
    """anomalib's metric takes them and fails at epoch end (an IndexError), or pairs scores
    with other images' labels; ours names them at the batch, which is then not folded."""
    good = val_batch(100)
    fields = dict(good)
    if change == "mask shape":
        fields["gt_mask"] = fields["gt_mask"][:, :, :4].contiguous()
    elif change == "label count":
        fields["gt_label"] = fields["gt_label"][:2]
    elif change == "label axis":
        fields["gt_label"] = fields["gt_label"][None]
    elif change == "complex labels":
        fields["gt_label"] = fields["gt_label"].to(torch.complex64)
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    with pytest.raises(ValueError, match=match):
        ours.on_validation_batch_end(None, None, raw_batch(fields))
    validate(ours, [good], raw_batch)  # the bad batch was not folded
    validate(theirs, [good], raw_batch)
    assert_same_buffers(ours, theirs)


def test_nonfinite_scores_leave_the_thresholds_of_the_clean_batches():
    import jaxnorm

    batches = [val_batch(120 + i) for i in range(3)]
    batches[1]["anomaly_map"][0, 0, 0] = math.nan
    ours = PostProcessor()
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="'batch.anomaly_map'"):
        validate(ours, batches)
    theirs = AnomalibPostProcessor()
    validate(theirs, [batches[0], batches[2]])
    assert_same_buffers(ours, theirs)
