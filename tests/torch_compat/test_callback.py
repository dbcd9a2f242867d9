"""anomalib 0.x's ``MinMaxNormalizationCallback`` (torch_compat/_callback.py) driven by hand
(trainer=None), against the numpy reference: the hooks, statistics, thresholds, options and
errors. The Lightning runs are in test_lightning.py; the DLPack exchange in test_dlpack.py;
the steady paths in test_steady.py; the DDP reduction in test_allreduce.py.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

import jaxnorm
import jaxnorm.testing
import torch_compat
import torch_compat._allreduce
import torch_compat._callback
import torch_compat._change
from tests import compat, reference
from tests.torch_compat.module_protocol import (
    IMAGE_T,
    PIXEL_T,
    Module,
    Threshold,
    assert_matches_reference,
    clone,
    fitted,
    make_outputs,
    to_numpy,
    validate,
)
from torch_compat.pytorch_lightning import MinMaxNormalizationCallback


def test_hooks_by_hand_match_reference():
    val = [make_outputs(s, scale=1 + s) for s in range(3)]
    raw_val = [clone(b) for b in val]
    module, cb = fitted(val)
    for b, r in zip(val, raw_val, strict=True):  # validation outputs are left as they were
        for key in ("anomaly_maps", "pred_scores"):
            assert torch.equal(b[key], r[key])
    lo, hi = reference.min_max(*[reference.stats_source(to_numpy(b)) for b in raw_val])
    assert module.normalization_metrics.read() == {"image": (lo, hi), "pixel": (lo, hi)}
    assert cb.hook.host_stats() == {"image": (lo, hi), "pixel": (lo, hi)}

    cb.on_test_start(None, module)
    for seed in (10, 11):
        raw = make_outputs(seed, scale=4.0)
        outputs = clone(raw)
        label = outputs["label"]
        assert cb.on_test_batch_end(None, module, outputs, None, 0) is None
        assert outputs["label"] is label  # other keys pass through untouched
        assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi)
    raw = {"pred_scores": torch.linspace(-3, 5, 7)}
    outputs = clone(raw)
    cb.on_predict_batch_end(None, module, outputs, None, 0)
    assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi)


def test_stats_source_precedence_boxes_then_scores():
    raw = make_outputs(0)
    del raw["anomaly_maps"]
    module, _ = fitted([clone(raw)])
    assert module.normalization_metrics.read()["image"] == reference.min_max(
        reference.stats_source(to_numpy(raw))
    )
    del raw["box_scores"]
    module, _ = fitted([clone(raw)])
    assert module.normalization_metrics.read()["image"] == reference.min_max(
        to_numpy(raw)["pred_scores"]
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_shape_device_round_trip_through_the_callback(dtype):
    module, cb = fitted([make_outputs(0, dtype=dtype), make_outputs(1, dtype=dtype)])
    lo, hi = module.normalization_metrics.read()["image"]
    raw = make_outputs(5, scale=3.0, dtype=dtype)
    outputs = clone(raw)
    cb.on_test_batch_end(None, module, outputs, None, 0)
    # the result is rounded to the input's dtype
    atol = {torch.float16: 1e-3, torch.bfloat16: 4e-3}.get(dtype, 1e-6)
    assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi, atol=atol)


def test_requires_grad_and_non_contiguous_outputs():
    base = torch.randn(3, 1, 5, 10)
    maps = base[..., ::2].requires_grad_(True)  # a leaf that needs grad, and not contiguous
    assert not maps.is_contiguous()
    scores = (torch.randn(3, requires_grad=True) * 2)[::1]  # a non-leaf with grad history
    module, cb = fitted([{"anomaly_maps": maps, "pred_scores": scores}])
    lo, hi = reference.min_max(maps.detach().numpy())
    assert module.normalization_metrics.read()["image"] == (lo, hi)
    raw = {"anomaly_maps": maps.detach().clone(), "pred_scores": scores.detach().clone()}
    outputs = {"anomaly_maps": maps, "pred_scores": scores}
    cb.on_predict_batch_end(None, module, outputs, None, 0)
    assert not outputs["anomaly_maps"].requires_grad
    assert outputs["anomaly_maps"].is_contiguous()
    assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi)


def test_missing_keys_raise_anomalib_message():
    module, cb = fitted([make_outputs(0)])
    message = re.escape(reference.NO_VALUES_MESSAGE)
    with pytest.raises(ValueError, match=message):
        cb.on_validation_batch_end(None, module, {"label": torch.arange(2)}, None, 0)
    with pytest.raises(ValueError, match=message):
        cb.on_test_batch_end(None, module, {"image": torch.zeros(2)}, None, 0)
    with pytest.raises(ValueError, match="expected the dict a step returns, got NoneType"):
        cb.on_predict_batch_end(None, module, None, None, 0)
    with pytest.raises(ValueError, match=r"outputs\['pred_scores'\]: expected a torch.Tensor"):
        cb.on_test_batch_end(None, module, {"pred_scores": [0.1, 0.2]}, None, 0)


def test_setup_attaches_keeps_a_compatible_one_and_rejects_others():
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module)  # anomalib's default stage=None
    metrics = module.normalization_metrics
    assert isinstance(metrics, torch_compat.MinMax)
    assert (float(metrics.min), float(metrics.max)) == (math.inf, -math.inf)
    metrics.write({"image": (-1.0, 2.0), "pixel": (-1.0, 2.0)})
    cb.setup(None, module, "test")  # e.g. restored from a checkpoint: kept, values and all
    assert module.normalization_metrics is metrics
    assert metrics.read()["image"] == (-1.0, 2.0)

    module.normalization_metrics = torch.nn.Linear(1, 1)
    expected = (
        "pl_module.normalization_metrics is a torch.nn.modules.linear.Linear without "
        "tensors 'min' and 'max' ('min' missing, 'max' missing); "
    )
    with pytest.raises(AttributeError, match=f"^{re.escape(expected)}.*torch_compat.MinMax"):
        cb.setup(None, module, "fit")


def test_on_test_start_sets_metric_thresholds_and_skips_none():
    val = [make_outputs(0)]
    module, cb = fitted(val)
    cb.on_test_start(None, module)
    assert module.image_metrics.thresholds == [0.5]
    assert module.pixel_metrics.thresholds == [0.5]
    module.pixel_metrics = None
    cb.on_test_start(None, module)
    assert module.image_metrics.thresholds == [0.5, 0.5]


def test_reset_each_epoch_by_default_and_accumulate_option():
    first = [make_outputs(0, scale=10.0)]  # e.g. the sanity check: extreme values
    second = [make_outputs(1), make_outputs(2)]
    for accumulate, epochs in ((False, [second]), (True, [first, second])):
        module, cb = fitted(first, accumulate=accumulate)
        validate(cb, module, second)
        want = reference.min_max(*[reference.stats_source(to_numpy(b)) for e in epochs for b in e])
        assert module.normalization_metrics.read()["image"] == want, accumulate
        assert cb.hook.host_stats()["image"] == want


def test_accumulation_resumes_from_restored_buffers():
    """Resuming from a checkpoint: accumulation goes on from the saved statistics."""
    for accumulate, want in ((True, (-10.0, 10.0)), (False, (1.0, 2.0))):
        module, cb = Module(), MinMaxNormalizationCallback(accumulate=accumulate)
        cb.setup(None, module, "fit")
        state = module.state_dict()
        state["normalization_metrics.min"] = torch.tensor(-10.0)
        state["normalization_metrics.max"] = torch.tensor(10.0)
        module.load_state_dict(state)  # what Lightning does after setup
        validate(cb, module, [{"pred_scores": torch.tensor([1.0, 2.0])}])
        assert module.normalization_metrics.read()["image"] == want, accumulate


def test_separate_stats_in_buffers_and_outputs():
    val = [make_outputs(0, scale=2.0), make_outputs(1, shift=3.0)]
    raw_val = [to_numpy(b) for b in val]
    module, cb = fitted(val, stats="separate")
    image = reference.min_max(*[b["pred_scores"] for b in raw_val])
    pixel = reference.min_max(*[b["anomaly_maps"] for b in raw_val])
    state = module.state_dict()
    assert sorted(state) == [
        "image_threshold.value",
        "normalization_metrics.max",
        "normalization_metrics.min",
        "normalization_metrics.pixel_max",
        "normalization_metrics.pixel_min",
        "pixel_threshold.value",
    ]
    assert (
        float(state["normalization_metrics.min"]),
        float(state["normalization_metrics.max"]),
    ) == image
    assert (
        float(state["normalization_metrics.pixel_min"]),
        float(state["normalization_metrics.pixel_max"]),
    ) == pixel

    cb.on_test_start(None, module)
    raw = make_outputs(7, scale=3.0)
    outputs = clone(raw)
    cb.on_test_batch_end(None, module, outputs, None, 0)
    n = to_numpy(raw)
    np.testing.assert_allclose(
        outputs["pred_scores"].numpy(),
        reference.normalize(n["pred_scores"], IMAGE_T, *image),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        outputs["anomaly_maps"].numpy(),
        reference.normalize(n["anomaly_maps"], PIXEL_T, *pixel),
        atol=1e-6,
    )
    for g, b in zip(outputs["box_scores"], n["box_scores"], strict=True):
        np.testing.assert_allclose(g.numpy(), reference.normalize(b, PIXEL_T, *pixel), atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_raises_with_key_and_count(bad):
    good = make_outputs(0)
    module, cb = fitted([make_outputs(2, scale=7.0)])  # last epoch's statistics differ
    poisoned = make_outputs(1, scale=100.0)
    poisoned["anomaly_maps"][0, 0, :2, 0] = bad
    cb.on_validation_epoch_start(None, module)
    cb.on_validation_batch_end(None, module, good, None, 0)
    cb.on_validation_batch_end(None, module, poisoned, None, 1)  # no per-batch host read
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="2 non-finite.*'anomaly_maps'") as e:
        cb.on_validation_epoch_end(None, module)
    assert (e.value.key, e.value.count) == ("anomaly_maps", 2)
    assert "validation batch 1" in str(e.value)
    # The poisoned batch was not folded in, and the clean batch's statistics were stored.
    clean = reference.min_max(to_numpy(good)["anomaly_maps"])
    assert module.normalization_metrics.read()["image"] == clean


def test_nonfinite_omit_skips_them():
    poisoned = make_outputs(1)
    poisoned["anomaly_maps"][1, 0, 0, :3] = math.nan
    module, cb = fitted([poisoned], nonfinite="omit")
    maps = to_numpy(poisoned)["anomaly_maps"]
    assert module.normalization_metrics.read()["image"] == reference.min_max(
        maps[np.isfinite(maps)]
    )
    assert cb.hook.num_nonfinite["image"] == 3


def test_no_stats_is_a_clear_error_not_half():
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "test")
    with pytest.raises(jaxnorm.StatisticsMissingError, match="run validation"):
        cb.on_test_start(None, module)
    with pytest.raises(jaxnorm.StatisticsMissingError, match="run validation"):
        cb.on_predict_batch_end(None, module, {"pred_scores": torch.zeros(3)}, None, 0)
    # a validation epoch without finite values leaves empty statistics: same error
    module, cb = fitted([{"pred_scores": torch.full((3,), math.nan)}], nonfinite="omit")
    with pytest.raises(jaxnorm.StatisticsMissingError):
        cb.on_test_start(None, module)


def test_degenerate_range_gives_0_half_1_never_nan():
    module, cb = fitted([{"pred_scores": torch.full((4,), 2.0)}])
    module.image_threshold.value.fill_(2.0)
    outputs = {"pred_scores": torch.tensor([1.0, 2.0, 3.0, -math.inf, math.inf])}
    cb.on_predict_batch_end(None, module, outputs, None, 0)
    assert outputs["pred_scores"].tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]


def test_thresholds_are_read_from_the_module_at_every_batch():
    module, cb = fitted([make_outputs(0)])
    lo, hi = module.normalization_metrics.read()["image"]
    for image_t in (0.1, -0.4):
        module.image_threshold.value.fill_(image_t)  # in place, e.g. a threshold metric update
        outputs = {"pred_scores": torch.linspace(-2, 2, 5)}
        cb.on_test_batch_end(None, module, outputs, None, 0)
        want = reference.normalize(np.linspace(-2, 2, 5), np.float32(image_t), lo, hi)
        np.testing.assert_allclose(outputs["pred_scores"].numpy(), want, atol=1e-6)
    module.pixel_threshold = Threshold(5.0)  # a new object
    outputs = {"anomaly_maps": torch.linspace(-2, 2, 5)}
    cb.on_test_batch_end(None, module, outputs, None, 0)
    want = reference.normalize(np.linspace(-2, 2, 5), 5.0, lo, hi)
    np.testing.assert_allclose(outputs["anomaly_maps"].numpy(), want, atol=1e-6)

    del module.image_threshold
    with pytest.raises(AttributeError, match=r"pl_module.image_threshold.value is missing"):
        cb.on_test_batch_end(None, module, {"pred_scores": torch.zeros(2)}, None, 0)
    module.image_threshold = Threshold(math.nan)
    with pytest.raises(ValueError, match="image_threshold is nan"):
        cb.on_test_batch_end(None, module, {"pred_scores": torch.zeros(2)}, None, 0)


def test_shared_checkpoint_loads_into_separate_stats_and_not_the_reverse():
    shared, _ = fitted([make_outputs(0)])
    module, cb = Module(), MinMaxNormalizationCallback(stats="separate")
    cb.setup(None, module, "test")
    module.load_state_dict(shared.state_dict())  # strict: the pixel keys are filled in
    lohi = shared.normalization_metrics.read()["image"]
    assert module.normalization_metrics.read() == {"image": lohi, "pixel": lohi}

    separate, _ = fitted([make_outputs(0)], stats="separate")
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "test")
    with pytest.raises(RuntimeError, match=r"stats='separate'\) to load it"):
        module.load_state_dict(separate.state_dict())
    # a separate MinMax met by a shared callback is refused rather than silently merged
    with pytest.raises(ValueError, match="created with stats='shared'"):
        cb.setup(None, separate, "test")


def test_stats_are_read_back_from_the_buffers_whenever_they_change():
    """Restored, replaced or loaded between batches: normalization follows the buffers."""
    source, _ = fitted([make_outputs(0)])
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "predict")
    module.load_state_dict(source.state_dict())
    scores = torch.linspace(-3, 3, 7)

    def predict_and_check(lo, hi):
        outputs = {"pred_scores": scores.clone()}
        cb.on_predict_batch_end(None, module, outputs, None, 0)  # no on_predict_start by hand
        want = reference.normalize(scores.numpy(), IMAGE_T, lo, hi)
        np.testing.assert_allclose(outputs["pred_scores"].numpy(), want, atol=1e-6)

    predict_and_check(*source.normalization_metrics.read()["image"])
    state = module.state_dict()
    state["normalization_metrics.min"] = torch.tensor(-10.0)
    state["normalization_metrics.max"] = torch.tensor(10.0)
    module.load_state_dict(state)  # loaded in place between two batches
    predict_and_check(-10.0, 10.0)
    module.normalization_metrics = torch_compat.MinMax()  # replaced
    module.normalization_metrics.write({"image": (0.5, 1.0), "pixel": (0.5, 1.0)})
    predict_and_check(0.5, 1.0)


@compat.needs_lightning
def test_namespaces_share_one_implementation():
    lightning = pytest.importorskip("lightning")  # not in anomalib 0.x's stack
    import pytorch_lightning

    import torch_compat.lightning

    assert issubclass(torch_compat.MinMaxNormalizationCallback, pytorch_lightning.Callback)
    assert issubclass(
        torch_compat.lightning.MinMaxNormalizationCallback, lightning.pytorch.Callback
    )
    assert not issubclass(
        torch_compat.lightning.MinMaxNormalizationCallback, pytorch_lightning.Callback
    )
    for cls in (
        torch_compat.MinMaxNormalizationCallback,
        torch_compat.lightning.MinMaxNormalizationCallback,
    ):
        assert issubclass(cls, torch_compat._callback.MinMaxNormalizationHooks)


ANOMALIB_SIGNATURES = {
    "setup": ["trainer", "pl_module", "stage"],
    "on_validation_epoch_start": ["trainer", "pl_module"],
    "on_validation_batch_end": [
        "trainer",
        "pl_module",
        "outputs",
        "batch",
        "batch_idx",
        "dataloader_idx",
    ],
    "on_validation_epoch_end": ["trainer", "pl_module"],
    "on_test_start": ["trainer", "pl_module"],
    "on_test_batch_end": [
        "trainer",
        "pl_module",
        "outputs",
        "batch",
        "batch_idx",
        "dataloader_idx",
    ],
    "on_predict_batch_end": [
        "trainer",
        "pl_module",
        "outputs",
        "batch",
        "batch_idx",
        "dataloader_idx",
    ],
}


@pytest.mark.parametrize("hook", sorted(ANOMALIB_SIGNATURES))
def test_hook_signatures(hook):
    params = inspect.signature(getattr(MinMaxNormalizationCallback, hook)).parameters
    assert list(params)[1:] == ANOMALIB_SIGNATURES[hook]
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {
        k: v for k, v in {"stage": None, "dataloader_idx": 0}.items() if k in params
    }


def test_options_are_checked():
    with pytest.raises(ValueError, match="stats='both'"):
        MinMaxNormalizationCallback(stats="both")
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        MinMaxNormalizationCallback(nonfinite="skip")
    assert repr(MinMaxNormalizationCallback(accumulate=True)) == (
        "MinMaxNormalizationCallback(stats='shared', accumulate=True, nonfinite='raise')"
    )
