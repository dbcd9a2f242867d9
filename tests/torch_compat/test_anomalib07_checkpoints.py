"""Checkpoints between torch_compat and anomalib 0.7, through real pytorch_lightning Trainers.

anomalib is not installed here (its real-model test runs in its own environment); these tests
reproduce what anomalib 0.7.0 does on the paths a checkpoint takes, written from its code
(``benchmarks.anomalib_ref`` holds the metric and the callback, which the benchmarks time too):

- ``AnomalibMinMax``: ``anomalib.utils.metrics.MinMax``, a torchmetrics Metric whose ``min``
  and ``max`` states are persistent (src/anomalib/utils/metrics/min_max.py);
- ``AnomalyModule.load_state_dict``: puts a fresh ``MinMax`` on the module whenever the state
  dict holds ``normalization_metrics.max``, then loads (models/components/base/anomaly_module.py);
- ``AnomalibCallback``: anomalib's ``MinMaxNormalizationCallback``, which rejects any other
  ``normalization_metrics`` type (utils/callbacks/min_max_normalization.py);
- ``LoadModelCallback``: loads a checkpoint's state dict in ``setup``
  (utils/callbacks/model_loader.py).

Expected values come from the numpy reference (tests/reference.py, anomalib 0.7.0's formula)
applied to the raw outputs.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxnorm
import torch_compat
from benchmarks import anomalib_ref
from tests import reference
from tests.torch_compat import module_protocol as h
from tests.torch_compat import test_lightning as tl

pl = pytest.importorskip("pytorch_lightning")
torchmetrics = pytest.importorskip("torchmetrics")

pytestmark = [
    *tl.pytestmark,
    # The checkpoints here come from fits with a ModelCheckpoint that the tests leave out.
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
]
ns = tl.namespace("pytorch_lightning")


@pytest.fixture(autouse=True)
def _full_checkpoint_loads(monkeypatch):
    # Lightning < 2.4 calls torch.load without weights_only, which torch >= 2.6 makes True:
    # Lightning's own checkpoints (a pathlib path in ModelCheckpoint's state) are refused, with
    # either callback. The README's documented switch for anomalib 0.x users.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


# anomalib 0.7.0's MinMax metric and callback, as written there: the project's one
# restatement, which the benchmarks time too.
AnomalibMinMax = anomalib_ref.MinMax


class AnomalibModule(ns.Module):
    """The test module with anomalib 0.7's ``AnomalyModule.load_state_dict``."""

    def load_state_dict(self, state_dict, strict=True):
        if "normalization_metrics.max" in state_dict.keys():
            self.normalization_metrics = AnomalibMinMax()
        else:
            warnings.warn("No known normalization found in model weights.", stacklevel=2)
        return super().load_state_dict(state_dict, strict=strict)


class AnomalibCallback(anomalib_ref.MinMaxNormalizationCallback, pl.Callback):
    """anomalib 0.7.0's ``MinMaxNormalizationCallback``, a Lightning callback."""


class LoadModelCallback(pl.Callback):
    """anomalib 0.7.0's ``LoadModelCallback``: loads the weights in ``setup``."""

    def __init__(self, weights_path):
        self.weights_path = weights_path

    def setup(self, trainer, pl_module, stage=None):
        state = torch.load(self.weights_path, map_location=pl_module.device, weights_only=False)
        pl_module.load_state_dict(state["state_dict"])


def fit_checkpoint(tmp_path: Path, callback, module_cls=AnomalibModule) -> tuple[Path, list]:
    """Fits with ``callback``; returns the last checkpoint and the validation batches seen."""
    model = module_cls()
    checkpoint = ns.ModelCheckpoint(dirpath=tmp_path, filename="model")
    trainer = ns.Trainer(
        **{**tl.TRAINER, "enable_checkpointing": True, "default_root_dir": tmp_path},
        callbacks=[callback, checkpoint],
    )
    trainer.fit(model)
    return Path(checkpoint.best_model_path), model.raw


def all_validation(raw) -> list:
    return [b for key in sorted(raw) if key[0] in ("sanity", "val") for b in raw[key]]


def assert_test_matches(model, recorder, lo, hi):
    tl.assert_all_match(recorder.tested, model.raw[("test", 0)], lo, hi)


def test_anomalib_like_stand_ins_reproduce_the_failure_they_exist_for(tmp_path):
    # Negative control: anomalib's own callback refuses torch_compat's old module type, the
    # very error issue 9 reported for ours. If this stopped raising, the stand-ins would no
    # longer be faithful.
    model = AnomalibModule()
    model.normalization_metrics = torch.nn.Linear(1, 1)
    with pytest.raises(AttributeError, match="Expected normalization_metrics to be of type"):
        AnomalibCallback().setup(None, model)


def test_anomalib_stand_in_rejects_what_anomalib_rejects():
    # anomalib 0.7.0's callback raises on validation outputs without a key it knows, and its
    # normalize takes tensors, arrays and numpy float32/float64 scalars only (min_max.py).
    model = AnomalibModule()
    callback = AnomalibCallback()
    callback.setup(None, model)
    with pytest.raises(ValueError, match=reference.NO_VALUES_MESSAGE):
        callback.on_validation_batch_end(None, model, {"other": torch.ones(2)}, None, 0)
    with pytest.raises(ValueError, match="Targets must be either Tensor or Numpy array"):
        anomalib_ref.normalize(np.float16(1.0), 0.5, 0.0, 1.0)
    assert anomalib_ref.normalize(np.float32(2.0), 0.5, 0.0, 1.0) == 1.0


def test_trainer_test_ckpt_path_loads_into_anomalibs_metric(tmp_path):
    ckpt, raw = fit_checkpoint(tmp_path, ns.Callback())
    lo, hi = tl.stats_of(*raw[("val", 2)])
    model, recorder = AnomalibModule(image_threshold=0.0, pixel_threshold=0.0), ns.Recorder()
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback(), recorder])
    trainer.test(model, ckpt_path=ckpt)
    assert type(model.normalization_metrics) is AnomalibMinMax  # anomalib's load put it there
    assert_test_matches(model, recorder, lo, hi)
    predicted = trainer.predict(model)
    tl.assert_all_match(predicted, model.raw[("predict", 0)], lo, hi)


def test_load_from_checkpoint_then_test_and_predict(tmp_path):
    ckpt, raw = fit_checkpoint(tmp_path, ns.Callback())
    lo, hi = tl.stats_of(*raw[("val", 2)])
    model = AnomalibModule.load_from_checkpoint(ckpt)
    assert type(model.normalization_metrics) is AnomalibMinMax
    recorder = ns.Recorder()
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback(), recorder])
    trainer.test(model)
    assert_test_matches(model, recorder, lo, hi)


def test_load_model_callback_after_ours_replaces_the_metric_in_setup(tmp_path):
    ckpt, raw = fit_checkpoint(tmp_path, ns.Callback())
    lo, hi = tl.stats_of(*raw[("val", 2)])
    model, recorder = AnomalibModule(), ns.Recorder()
    # ours attaches a torch_compat.MinMax in setup; LoadModelCallback's load then replaces it
    callbacks = [ns.Callback(), LoadModelCallback(ckpt), recorder]
    trainer = ns.Trainer(**tl.TRAINER, callbacks=callbacks)
    trainer.test(model)
    assert type(model.normalization_metrics) is AnomalibMinMax
    assert_test_matches(model, recorder, lo, hi)


@pytest.mark.parametrize("module_cls", [AnomalibModule, ns.Module], ids=["anomalib", "plain"])
def test_anomalib_checkpoint_tested_with_ours(tmp_path, module_cls):
    ckpt, raw = fit_checkpoint(tmp_path, AnomalibCallback())
    # anomalib's metric never resets: its statistics span every validation epoch
    lo, hi = tl.stats_of(*all_validation(raw))
    model, recorder = module_cls(), ns.Recorder()
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback(), recorder])
    trainer.test(model, ckpt_path=ckpt)
    want = AnomalibMinMax if module_cls is AnomalibModule else torch_compat.MinMax
    assert type(model.normalization_metrics) is want
    assert_test_matches(model, recorder, lo, hi)


def test_our_checkpoint_tested_with_anomalibs_callback(tmp_path):
    ckpt, raw = fit_checkpoint(tmp_path, ns.Callback())
    lo, hi = tl.stats_of(*raw[("val", 2)])
    model, recorder = AnomalibModule(), ns.Recorder()
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[AnomalibCallback(), recorder])
    trainer.test(model, ckpt_path=ckpt)
    assert_test_matches(model, recorder, lo, hi)


def test_validation_writes_into_anomalibs_metric_in_place(tmp_path):
    ckpt, _ = fit_checkpoint(tmp_path, ns.Callback())
    model = AnomalibModule.load_from_checkpoint(ckpt)
    metric = model.normalization_metrics
    before = (metric.min, metric.max)
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback()])
    trainer.validate(model)
    assert model.normalization_metrics is metric
    assert metric.min is before[0] and metric.max is before[1]  # written in place
    assert (float(metric.min), float(metric.max)) == tl.stats_of(*model.raw[("val", 0)])


def test_separate_stats_refuse_a_metric_with_one_pair_before_validating():
    model, cb = h.Module(), ns.Callback(stats="separate")
    model.normalization_metrics = AnomalibMinMax()
    cb.setup(None, model, "validate")
    with pytest.raises(ValueError, match=r"torch_compat.MinMax\(stats='separate'\)"):
        cb.on_validation_epoch_start(None, model)


# -- statistics that come from outside (issue 10) -------------------------------------------


def _edited_checkpoint(tmp_path, ckpt, **values) -> Path:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for name, value in values.items():
        key = f"normalization_metrics.{name}"
        if value is None:
            del state["state_dict"][key]
        else:
            state["state_dict"][key] = torch.as_tensor(value, dtype=torch.float32)
    out = tmp_path / "edited.ckpt"
    torch.save(state, out)
    return out


BAD = [
    ({"min": math.nan}, "normalization_metrics.min", "nan"),
    ({"max": math.inf}, "normalization_metrics.max", "inf"),
    ({"min": -math.inf}, "normalization_metrics.min", "-inf"),
    ({"min": 2.0, "max": 1.0}, "normalization_metrics.max", r"\(1.0\) is smaller"),
    ({"min": [0.0, 1.0]}, "normalization_metrics.min", r"shape \(2,\)"),
]


@pytest.mark.parametrize(("values", "key", "shown"), BAD)
@pytest.mark.parametrize("module_cls", [AnomalibModule, ns.Module], ids=["anomalib", "plain"])
def test_unusable_statistics_in_a_checkpoint_fail_before_any_test_step(
    tmp_path, module_cls, values, key, shown
):
    ckpt, _ = fit_checkpoint(tmp_path, ns.Callback())
    bad = _edited_checkpoint(tmp_path, ckpt, **values)
    model = module_cls()
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback()])
    # ours knows it loaded them; anomalib's metric is just what normalization_metrics holds
    source = "normalization_metrics" if module_cls is AnomalibModule else "checkpoint"
    pattern = rf"{source}: '{key}'.*{shown}"
    if module_cls is ns.Module and "shape" in shown:  # refused by the load itself
        pattern = rf"{key}: checkpoint value \(2,\) is not one number"
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        trainer.test(model, ckpt_path=bad)
    assert ("test", 0) not in model.raw  # no test step ran


def test_empty_statistics_in_a_checkpoint_mean_no_statistics(tmp_path):
    ckpt, _ = fit_checkpoint(tmp_path, ns.Callback())
    empty = _edited_checkpoint(tmp_path, ckpt, min=math.inf, max=-math.inf)
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback()])
    with pytest.raises(jaxnorm.StatisticsMissingError):
        trainer.test(ns.Module(), ckpt_path=empty)


def test_checkpoint_without_the_keys_says_what_to_do(tmp_path):
    ckpt, _ = fit_checkpoint(tmp_path, ns.Callback())
    bare = _edited_checkpoint(tmp_path, ckpt, min=None, max=None)
    trainer = ns.Trainer(**tl.TRAINER, callbacks=[ns.Callback()])
    model = ns.Module()
    # Torch's strict-loading error names both keys, and the explanation says what to do.
    with pytest.raises(RuntimeError, match="holds no normalization statistics") as info:
        trainer.test(model, ckpt_path=bare)
    message = str(info.value)
    assert '"normalization_metrics.min"' in message and "normalization_metrics.max" in message
    assert message.count("holds no normalization statistics") == 1
    assert "trainer.validate" in message
    # non-strict loading reports the plain keys and leaves the statistics empty: test says
    # to validate
    model = ns.Module()
    model.normalization_metrics = torch_compat.MinMax()
    result = model.load_state_dict(torch.load(bare, weights_only=False)["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["normalization_metrics.max", "normalization_metrics.min"]
    assert all(repr(k) == repr(str(k)) for k in result.missing_keys)
    assert pickle.loads(pickle.dumps(result.missing_keys)) == result.missing_keys


def test_separate_checkpoint_into_shared_metric_says_what_to_do():
    separate = torch_compat.MinMax(stats="separate")
    separate.update(torch.tensor([1.0, 3.0]))
    state = {f"normalization_metrics.{k}": v for k, v in separate.state_dict().items()}
    module = torch.nn.Module()
    module.normalization_metrics = torch_compat.MinMax()
    with pytest.raises(RuntimeError, match=r"stats='separate'\) to load it"):
        module.load_state_dict(dict(state), strict=True)
    result = module.load_state_dict(dict(state), strict=False)
    assert sorted(result.unexpected_keys) == [
        "normalization_metrics.pixel_max",
        "normalization_metrics.pixel_min",
    ]
    assert result.missing_keys == []


def test_meta_device_statistics_and_outputs_get_clear_errors():
    module, cb = h.fitted([h.make_outputs(0)])
    with pytest.raises(ValueError, match=r"outputs\['anomaly_maps'\]: a tensor on the 'meta'"):
        cb.on_test_batch_end(
            None, module, {"anomaly_maps": torch.empty(2, 1, 3, 3, device="meta")}, None, 0
        )
    module.normalization_metrics.min = torch.empty((), device="meta")
    with pytest.raises(ValueError, match="'normalization_metrics.min' is a tensor on the 'meta'"):
        cb.on_test_start(None, module)


WIDE = [torch.int64] + ([torch.uint64] if hasattr(torch, "uint64") else [])


@pytest.mark.parametrize("dtype", WIDE)
def test_wide_integer_scores_do_not_wrap(dtype):
    big = 2**40
    values = torch.tensor([big, big + 2**20, big + 2**30], dtype=dtype)
    np.testing.assert_array_equal(
        np.asarray(torch_compat.to_jax(values)), values.double().numpy().astype(np.float32)
    )
    module, cb = h.Module(), ns.Callback()
    h.validate(cb, module, [{"pred_scores": values}])
    lo, hi = module.normalization_metrics.read()["image"]
    assert (lo, hi) == (float(np.float32(big)), float(np.float32(big + 2**30)))


def test_checkpoint_keys_load_both_ways_with_anomalib():
    module, _ = h.fitted([h.make_outputs(0)])
    ours = module.state_dict()
    theirs_module = h.Module()
    theirs_module.normalization_metrics = AnomalibMinMax()
    assert sorted(theirs_module.state_dict()) == sorted(ours)
    theirs_module.load_state_dict(ours)  # strict
    assert (
        float(theirs_module.normalization_metrics.min),
        float(theirs_module.normalization_metrics.max),
    ) == module.normalization_metrics.read()["image"]

    # an anomalib checkpoint into ours: a fresh process has a fresh callback and module
    theirs_module.normalization_metrics.reset()
    theirs_module.normalization_metrics.update(torch.tensor([-3.0, 0.25, 4.5]))
    fresh, cb = h.Module(), h.MinMaxNormalizationCallback()
    cb.setup(None, fresh, "test")
    fresh.load_state_dict(theirs_module.state_dict())  # strict
    cb.on_test_start(None, fresh)
    outputs = {"pred_scores": torch.tensor([-3.0, 1.3, 4.5])}
    cb.on_test_batch_end(None, fresh, outputs, None, 0)
    want = reference.normalize([-3.0, 1.3, 4.5], h.IMAGE_T, -3.0, 4.5)
    np.testing.assert_allclose(outputs["pred_scores"].numpy(), want, atol=1e-6)


# -- torch_compat.MinMax as a torchmetrics Metric (issue 9, point 5) ------------------------


def test_minmax_is_a_metric_with_anomalibs_calls():
    metric = torch_compat.MinMax()
    assert isinstance(metric, torchmetrics.Metric)
    a, b = torch.tensor([[-1.5, 2.0], [0.25, 3.0]]), torch.tensor([4.5, -0.5, math.nan])
    assert tuple(float(v) for v in metric(a)) == reference.min_max(a.numpy())  # forward: batch
    batch = metric(b)  # NaN skipped, as jaxnorm.MinMax skips it
    assert [float(v) for v in batch] == [-0.5, 4.5]
    assert [float(v) for v in metric.compute()] == [-1.5, 4.5]  # accumulated
    metric.update(torch.tensor([-7.0]))
    assert [float(v) for v in metric.compute()] == [-7.0, 4.5]
    metric.reset()
    assert (float(metric.min), float(metric.max)) == (math.inf, -math.inf)
    assert sorted(metric.state_dict()) == ["max", "min"]


def test_minmax_update_keeps_state_dtype_and_the_separate_pair():
    metric = torch_compat.MinMax("separate")
    metric.update(torch.tensor([1.0, 2.0], dtype=torch.float64), pixel=torch.tensor([-3.0, 9.0]))
    assert metric.min.dtype == torch.float32
    assert metric.read() == {"image": (1.0, 2.0), "pixel": (-3.0, 9.0)}
    with pytest.raises(ValueError, match="shared statistics"):
        torch_compat.MinMax().update(pixel=torch.ones(2))


def test_minmax_state_dicts_load_both_ways_with_anomalibs_metric():
    theirs = AnomalibMinMax()
    theirs.update(torch.tensor([-2.0, 5.0]))
    ours = torch_compat.MinMax()
    ours.load_state_dict(theirs.state_dict())
    assert ours.read()["image"] == (-2.0, 5.0)
    assert ours.loaded_from_checkpoint
    assert [float(v) for v in ours.compute()] == [-2.0, 5.0]  # no warning, no stale cache
    ours.update(torch.tensor([7.0]))
    back = AnomalibMinMax()
    back.load_state_dict(ours.state_dict())
    assert (float(back.min), float(back.max)) == (-2.0, 7.0)


def test_loading_writes_in_place_keeping_device_and_dtype():
    ours = torch_compat.MinMax()
    lo = ours.min
    ours.load_state_dict({"min": torch.tensor(-1.0, dtype=torch.float64), "max": torch.tensor(3.0)})
    assert ours.min is lo and ours.min.dtype == torch.float32
    assert ours.read()["image"] == (-1.0, 3.0)


def test_compute_after_the_callback_wrote_returns_the_new_values():
    module, cb = h.fitted([h.make_outputs(0)])
    metric = module.normalization_metrics
    first = [float(v) for v in metric.compute()]
    h.validate(cb, module, [h.make_outputs(5, scale=9.0)])
    assert [float(v) for v in metric.compute()] == list(metric.read()["image"]) != first
