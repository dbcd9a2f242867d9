"""torch_compat.anomalib1.MinMaxNormalizationCallback in place of anomalib 1.x's own, in real
anomalib runs.

Each model of ``common.MODELS`` (Padim and PatchCore, resnet18 without pre-trained weights, at
64x64) is trained twice on a synthetic ``Folder`` dataset this test writes, from the same
seed: once with the callback ``Engine`` adds by itself (``_MinMaxNormalizationCallback``),
once with ``Engine(normalization=MinMaxNormalizationCallback())``, the one-line swap. Everything
a user gets must be the same: the statistics in ``normalization_metrics`` (anomalib's own
``MinMax`` instances), test metrics, every predict output (``pred_scores``, ``anomaly_maps``,
``pred_labels``, ``pred_masks``, ``pred_boxes``, ``box_scores``, ``box_labels``), the
checkpoint's keys and values, ``engine.test(ckpt_path=...)`` and ``load_from_checkpoint``
with either run's checkpoint, the TORCH export's metadata and ``TorchInferencer`` on it.

`make test-anomalib1` runs every test with anomalib 1.2.0 (the per-output design), then again
with anomalib 1.1.0 (the shared design); each test expects what the installed design does.

Run it with ``make test-anomalib1`` (its own venv, ci/anomalib1-constraints.txt).
"""

from __future__ import annotations

import contextlib

import common
import numpy as np
import pytest
import torch
from common import NORMALIZATION_KEYS, OUTPUT_KEYS, assert_same

from torch_compat.anomalib1 import BoxScoresWarning, MinMaxNormalizationCallback

MODELS = ["padim", "patchcore"]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return common.write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def runs(data, tmp_path_factory):
    """{(model, kind): Run}: each model trained with each callback, lazily."""
    cache = {}

    def get(name, kind):
        if (name, kind) not in cache:
            cache[name, kind] = common.train(
                name, kind, data, tmp_path_factory.mktemp(f"{name}-{kind}")
            )
        return cache[name, kind]

    return get


def test_the_design_is_detected_from_anomalibs_own_callback():
    assert MinMaxNormalizationCallback().design == common.expected_design()


def test_engine_finds_it_as_its_normalization_callback(tmp_path):
    from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
    from anomalib.engine import Engine

    ours = MinMaxNormalizationCallback()
    engine = Engine(normalization=ours, default_root_dir=tmp_path, logger=False)
    engine._setup_trainer(common.model("padim"))
    assert engine.normalization_callback is ours
    assert not any(isinstance(c, _MinMaxNormalizationCallback) for c in engine.trainer.callbacks)


def _assert_stats_equal(ours, theirs):
    from anomalib.metrics import MinMax
    from torchmetrics import MetricCollection

    assert type(ours) is type(theirs)
    if common.expected_design() == "per-output":
        assert isinstance(ours, MetricCollection)
        assert sorted(ours.keys()) == sorted(NORMALIZATION_KEYS)
        metrics = list(ours.values()) + list(theirs.values())
    else:
        metrics = [ours, theirs]
    assert all(type(m) is MinMax for m in metrics)
    assert common.stats(ours) == common.stats(theirs)
    for m in metrics:
        assert m.min.dtype == m.max.dtype == torch.float32 and m.min.shape == ()


@pytest.mark.parametrize("name", MODELS)
def test_the_swap_changes_nothing_a_user_sees(runs, name):
    ours, theirs = runs(name, "jaxnorm"), runs(name, "anomalib")
    assert type(ours.engine.normalization_callback) is MinMaxNormalizationCallback
    assert type(theirs.engine.normalization_callback).__name__ == "_MinMaxNormalizationCallback"
    _assert_stats_equal(ours.model.normalization_metrics, theirs.model.normalization_metrics)
    stats = common.stats(ours.model.normalization_metrics)
    if common.expected_design() == "per-output":
        # validation outputs hold maps and scores, never box scores (SPEC §9)
        assert stats["box_scores"] == (float("inf"), float("-inf"))
        for key in ("anomaly_maps", "pred_scores"):
            assert np.isfinite(stats[key]).all() and stats[key][0] < stats[key][1], key
        # the image scores are the maps' maxima: inside the maps' range, not equal to it
        assert stats["pred_scores"] != stats["anomaly_maps"]
    else:
        assert np.isfinite(stats[""]).all() and stats[""][0] < stats[""][1]
    assert ours.test_metrics == theirs.test_metrics
    assert {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"} <= set(
        ours.test_metrics
    )
    assert len(ours.predictions) == len(theirs.predictions) > 0
    for i, (a, b) in enumerate(zip(ours.predictions, theirs.predictions, strict=True)):
        assert a.keys() == b.keys(), i
        assert set(OUTPUT_KEYS) <= a.keys(), sorted(a)
        for key in a:
            assert_same(a[key], b[key], (i, key), ulp=key in common.NORMALIZED)
        # normalized: in [0, 1]; labels and masks from the raw scores, before normalization
        assert 0 <= a["pred_scores"].min() and a["pred_scores"].max() <= 1
        assert 0 <= a["anomaly_maps"].min() and a["anomaly_maps"].max() <= 1
    boxes = torch.cat([s for p in ours.predictions for s in p["box_scores"]])
    assert boxes.numel() > 0
    if common.expected_design() == "per-output":
        # anomalib's box statistics stay empty: every box score becomes exactly 0.5. Ours
        # gives the same, and says why, once per run (test and predict).
        assert torch.equal(boxes, torch.full_like(boxes, 0.5))
        assert len(ours.warned) == 1 and "box_scores" in ours.warned[0], ours.warned
    else:
        assert not torch.equal(boxes, torch.full_like(boxes, 0.5))
        assert ours.warned == []


@pytest.mark.parametrize("name", MODELS)
def test_checkpoints_hold_the_same_keys_and_load_both_ways(runs, name, data):
    ours, theirs = runs(name, "jaxnorm"), runs(name, "anomalib")
    ckpts = {
        r.kind: torch.load(r.checkpoint, map_location="cpu", weights_only=False)
        for r in (ours, theirs)
    }
    a, b = ckpts["jaxnorm"]["state_dict"], ckpts["anomalib"]["state_dict"]
    assert a.keys() == b.keys()
    keys = sorted(k for k in a if "normalization" in k)
    if common.expected_design() == "per-output":
        want = [
            f"normalization_metrics.{n}.{s}" for n in NORMALIZATION_KEYS for s in ("max", "min")
        ]
        want += [f"{n}_normalization_class" for n in NORMALIZATION_KEYS]
    else:
        want = ["normalization_class", "normalization_metrics.max", "normalization_metrics.min"]
    assert keys == sorted(want)
    for k in keys:
        assert_same(a[k], b[k], k)
    for k in keys:
        if k.endswith("normalization_class"):
            assert a[k] == "anomalib.metrics.min_max.MinMax", (k, a[k])
    # engine.test(ckpt_path=...) with the other callback, on a fresh model: the statistics
    # come from the checkpoint, the metrics are the run's
    for run, kind in ((theirs, "jaxnorm"), (ours, "anomalib")):
        fresh = common.model(name)
        engine = common.engine(run.root / f"retest-{kind}", kind)
        with pytest.warns(BoxScoresWarning) if _warns(kind) else contextlib.nullcontext():
            (metrics,) = engine.test(
                fresh, datamodule=common.datamodule(data), ckpt_path=run.checkpoint
            )
        assert metrics == run.test_metrics, (kind, run.kind)
        _assert_stats_equal(fresh.normalization_metrics, run.model.normalization_metrics)
    # load_from_checkpoint, either checkpoint
    for run in (ours, theirs):
        loaded = type(run.model).load_from_checkpoint(run.checkpoint)
        _assert_stats_equal(loaded.normalization_metrics, run.model.normalization_metrics)


def _warns(kind: str) -> bool:
    return kind == "jaxnorm" and common.expected_design() == "per-output"


@pytest.mark.parametrize("name", MODELS)
def test_the_torch_export_and_its_inferencer(runs, name, data, tmp_path):
    from anomalib.deploy import ExportType, TorchInferencer

    metadata, results = {}, {}
    image = data / "bad" / "003.png"
    for run in (runs(name, "jaxnorm"), runs(name, "anomalib")):
        path = run.engine.export(run.model, ExportType.TORCH, export_root=tmp_path / run.kind)
        metadata[run.kind] = torch.load(path, map_location="cpu", weights_only=False)["metadata"]
        inferencer = TorchInferencer(path=path, device="cpu")
        results[run.kind] = inferencer.predict(image)
    ours, theirs = metadata["jaxnorm"], metadata["anomalib"]
    assert ours == theirs
    if common.expected_design() == "per-output":
        # anomalib drops the all-inf box statistics
        assert {f"{k}.{s}" for k in ("anomaly_maps", "pred_scores") for s in ("min", "max")} <= set(
            ours
        )
        assert not any(k.startswith("box_scores") for k in ours)
    else:
        assert {"min", "max"} <= set(ours)
    a, b = results["jaxnorm"], results["anomalib"]
    for field in ("pred_score", "pred_label", "anomaly_map", "pred_mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert np.array_equal(np.asarray(x), np.asarray(y)), field
    assert 0 <= a.pred_score <= 1


def test_a_reused_callback_reads_the_statistics_of_each_load(runs, data, tmp_path):
    """One callback instance serves fit, then predict from a checkpoint whose statistics
    differ from the fit's: anomalib replaces ``normalization_metrics`` on load, and the
    callback must normalize with the new ones, as anomalib's callback does."""
    from anomalib.engine import Engine

    ours = runs("padim", "jaxnorm")
    ckpt = torch.load(ours.checkpoint, map_location="cpu", weights_only=False)
    widened = 0
    for key, value in ckpt["state_dict"].items():
        if key.startswith("normalization_metrics.") and torch.isfinite(value):
            ckpt["state_dict"][key] = value * (0.5 if key.endswith(".min") else 2.0)
            widened += 1
    assert widened >= 2
    path = tmp_path / "widened.ckpt"
    torch.save(ckpt, path)
    predictions = {}
    for kind, callback in (
        ("jaxnorm", ours.engine.normalization_callback),  # the instance that ran fit
        ("anomalib", common.callback("anomalib")),
    ):
        engine = Engine(normalization=callback, default_root_dir=tmp_path / kind, logger=False)
        fresh = common.model("padim")
        # the reused callback warned about box scores during its own run, and does not again
        predictions[kind] = engine.predict(
            fresh, datamodule=common.datamodule(data), ckpt_path=path
        )
        assert common.stats(fresh.normalization_metrics) != common.stats(
            ours.model.normalization_metrics
        )
    for i, (a, b) in enumerate(zip(predictions["jaxnorm"], predictions["anomalib"], strict=True)):
        for key in a:
            assert_same(a[key], b[key], (i, key), ulp=key in common.NORMALIZED)
    # and not what the fit's statistics give
    assert not torch.equal(
        predictions["jaxnorm"][0]["pred_scores"], ours.predictions[0]["pred_scores"]
    )
