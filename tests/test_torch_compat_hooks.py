"""MinMaxNormalizationCallback driven by hand (trainer=None), against the numpy reference.

The Lightning runs are in test_torch_compat_lightning.py; the DLPack exchange in
test_torch_compat_dlpack.py. The helpers here follow anomalib's AnomalyModule protocol and
are shared with those files.
"""

from __future__ import annotations

import inspect
import math
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

import jaxnorm
import jaxnorm.testing
import torch_compat
import torch_compat._allreduce
import torch_compat._callback
import torch_compat._change
from tests import compat, reference
from torch_compat.pytorch_lightning import MinMaxNormalizationCallback

IMAGE_T, PIXEL_T = 1.3, 0.7
KEYS = ("anomaly_maps", "pred_scores", "box_scores")


class Threshold(torch.nn.Module):
    """anomalib's AnomalyScoreThreshold as far as the callback reads it: a 0-d ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value))


class Metrics:
    """anomalib's metric collections as far as the callback uses them."""

    def __init__(self) -> None:
        self.thresholds: list[float] = []

    def set_threshold(self, value: float) -> None:
        self.thresholds.append(value)


class Module(torch.nn.Module):
    """The pl_module attributes anomalib's callback reads; no Lightning needed by hand."""

    def __init__(self, image_threshold=IMAGE_T, pixel_threshold=PIXEL_T, pixel_metrics=True):
        super().__init__()
        self.image_threshold = Threshold(image_threshold)
        self.pixel_threshold = Threshold(pixel_threshold)
        self.image_metrics = Metrics()
        self.pixel_metrics = Metrics() if pixel_metrics else None


def make_outputs(seed, n=3, scale=1.0, shift=0.0, boxes=True, dtype=torch.float32):
    """One batch of raw outputs with anomalib's keys; the first image has no boxes."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "anomaly_maps": (torch.randn((n, 1, 5, 5), generator=g) * scale + shift).to(dtype),
        "pred_scores": (torch.randn((n,), generator=g) * scale + shift + 1).to(dtype),
        "label": torch.arange(n),
    }
    if boxes:
        counts = [0] + [int(c) for c in torch.randint(1, 4, (n - 1,), generator=g)]
        out["box_scores"] = [
            (torch.randn((c,), generator=g) * scale + shift).to(dtype) for c in counts
        ]
    return out


def to_numpy(outputs):
    """Raw outputs as float64 numpy, for the reference (copies: the callback rewrites)."""
    out = {}
    for key, value in outputs.items():
        if key == "box_scores":
            out[key] = [b.detach().double().numpy() for b in value]
        elif key in KEYS:
            out[key] = value.detach().double().numpy()
    return out


def assert_matches_reference(got, raw, image_t, pixel_t, lo, hi, atol=1e-6):
    """``got`` (torch, normalized) equals the reference applied to ``raw`` (torch, raw)."""
    want = reference.normalize_batch(to_numpy(raw), image_t, pixel_t, lo, hi)
    for key in ("pred_scores", "anomaly_maps"):
        if key in raw:
            assert isinstance(got[key], torch.Tensor)
            assert got[key].dtype == raw[key].dtype and got[key].shape == raw[key].shape, key
            assert got[key].device == raw[key].device
            np.testing.assert_allclose(got[key].double().numpy(), want[key], atol=atol, err_msg=key)
    if "box_scores" in raw:
        assert isinstance(got["box_scores"], list)
        assert len(got["box_scores"]) == len(raw["box_scores"])
        for g, r, w in zip(got["box_scores"], raw["box_scores"], want["box_scores"], strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape
            np.testing.assert_allclose(g.double().numpy(), w, atol=atol)


def clone(outputs):
    return {
        k: [b.clone() for b in v] if isinstance(v, list) else v.clone() for k, v in outputs.items()
    }


def validate(cb, module, batches):
    cb.on_validation_epoch_start(None, module)
    for i, b in enumerate(batches):
        cb.on_validation_batch_end(None, module, b, None, i)
    cb.on_validation_epoch_end(None, module)


def fitted(batches, **options):
    """A module and callback that validated ``batches``."""
    module, cb = Module(), MinMaxNormalizationCallback(**options)
    cb.setup(None, module, "fit")
    validate(cb, module, batches)
    return module, cb


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_allreduce_stats_over_a_gloo_group(gloo_group):
    mins = np.array([0.5, -2.0], np.float32)
    maxs = np.array([3.0, np.inf], np.float32)
    counts = np.array([10, 2], np.int64)
    out = torch_compat.allreduce_stats(mins, maxs, counts)
    for got, want in zip(out, (mins, maxs, counts), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


GLOO_CYCLES = textwrap.dedent(
    """
    import socket, sys
    import numpy as np
    import torch.distributed as dist
    import torch_compat

    for i in range(int(sys.argv[1])):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
        torch_compat.allreduce_stats(
            np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.int64)
        )
        torch_compat._allreduce.broadcast_from_rank0([0.0, 1.0])
        dist.destroy_process_group()  # at once, as a run's teardown may
    print("cycles done")
    """
)


def test_destroying_the_group_right_after_a_reduction_does_not_hang():
    """torch 2.1's gloo (the floor) deadlocked when a worker thread freed the last reference
    to a collective's tensor while the main thread joined it in destroy_process_group: the
    reducer keeps its tensors, so their last release is the main thread's. Without that, the
    first cycles hang (seen on the floor); the subprocess's timeout turns a hang into a
    failure."""
    proc = subprocess.run(
        [sys.executable, "-c", GLOO_CYCLES, "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cycles done" in proc.stdout


def test_callback_reduces_and_raises_nonfinite_at_epoch_end_under_ddp(gloo_group):
    module, cb = fitted([make_outputs(0)])
    assert cb.hook.reducer is torch_compat.allreduce_stats
    lo, hi = reference.min_max(to_numpy(make_outputs(0))["anomaly_maps"])
    assert module.normalization_metrics.read()["image"] == (lo, hi)

    poisoned = make_outputs(1)
    poisoned["anomaly_maps"][0, 0, 0, :3] = math.nan
    cb.on_validation_epoch_start(None, module)
    cb.on_validation_batch_end(None, module, poisoned, None, 0)  # deferred: every rank raises
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="3 non-finite.*summed over all"):
        cb.on_validation_epoch_end(None, module)


def test_reducer_combines_ranks_with_min_max_sum(monkeypatch):
    """Another rank simulated in all_reduce: the callback must end with the global stats."""
    other = {
        dist.ReduceOp.MIN: (np.array([-7.0, -7.0], np.float32), np.minimum),
        dist.ReduceOp.MAX: (np.array([9.0, 9.0], np.float32), np.maximum),
        dist.ReduceOp.SUM: (np.array([4, 0], np.int64), np.add),
    }
    calls = []

    def all_reduce(tensor, op):
        values, combine = other[op]
        calls.append(op)
        tensor.copy_(torch.from_numpy(combine(tensor.numpy(), values)))

    monkeypatch.setattr(torch_compat._allreduce, "ddp_active", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    module, cb = fitted([{"pred_scores": torch.tensor([1.0, 2.0])}])
    assert calls == [dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.SUM]
    assert module.normalization_metrics.read()["image"] == (-7.0, 9.0)


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


class CountingTensor(torch.Tensor):
    """Counts host reads (``.item()``): each one waits for the GPU when the tensor is on it."""

    reads = 0

    def item(self):
        type(self).reads += 1
        return super().item()


def test_unchanged_thresholds_and_stats_are_not_read_again_per_batch(monkeypatch):
    # As on an accelerator, where a read waits for the device (CPU values are read: see
    # test_cpu_sources_are_keyed_by_value).
    monkeypatch.setattr(torch_compat._change, "on_host", lambda t: False)
    module, cb = fitted([make_outputs(0)])
    for threshold in (module.image_threshold, module.pixel_threshold):
        threshold.value = threshold.value.as_subclass(CountingTensor)
    metrics = module.normalization_metrics
    metrics.min, metrics.max = (t.as_subclass(CountingTensor) for t in (metrics.min, metrics.max))
    CountingTensor.reads = 0
    cb.on_test_start(None, module)
    for i in range(5):
        cb.on_test_batch_end(None, module, make_outputs(10 + i), None, i)
    assert CountingTensor.reads == 4  # min, max at test start; two thresholds at batch 0
    module.image_threshold.value.fill_(2.0)  # written in place: read again, once
    for i in range(3):
        cb.on_test_batch_end(None, module, make_outputs(20 + i), None, i)
    assert CountingTensor.reads == 5


def test_tensors_off_the_cpu_are_keyed_by_identity_storage_and_version():
    """Off the host a read would wait for the device: the key is the tensor's device, dtype,
    storage and version counter (inference tensors have none); values travel instead."""
    key = torch_compat._change.key
    with torch.inference_mode():
        inference = torch.empty((), device="meta")
    t = torch.empty((), device="meta")
    assert key(inference) == ("device", inference.device, torch.float32, 0, "inference")
    assert key(t) == ("device", t.device, torch.float32, 0, 0)
    t.add_(1)  # an in-place op bumps the version
    assert key(t)[-1] == 1
    watched = torch_compat._change.Watched()
    watched.remember((inference,), (key(inference),))
    assert watched.unchanged((inference,), (key(inference),))
    assert not watched.unchanged((torch.empty((), device="meta"),), (key(inference),))


def test_cpu_sources_are_keyed_by_value_and_dtype():
    """A CPU read costs nothing: its value is the key, so writes the version counter misses
    are seen; the dtype is part of it; NaN keys compare equal, and what is not one number is
    read (and named)."""
    key = torch_compat._change.key
    t = torch.tensor(1.5)
    assert key(t) == (torch.float32, 1.5)
    t.data.fill_(2.5)  # through .data: the version counter is not bumped
    t.numpy()[...] = 3.5  # nor through a numpy alias
    assert t._version == 0 and key(t) == (torch.float32, 3.5)
    assert key(t.half()) == (torch.float16, 3.5) != key(t)
    with torch.inference_mode():
        inference = torch.tensor(0.25)
    assert key(inference) == (torch.float32, 0.25)
    assert key(torch.tensor(math.nan)) == key(torch.tensor(-math.nan))
    assert key(torch.zeros(2)) is None
    assert key(np.float64(0.5)) == (np.dtype(np.float64), 0.5) and key(0.5) == (float, 0.5)


def test_copies_of_a_watched_cache_are_empty():
    import copy
    import pickle

    watched = torch_compat._change.Watched()
    t = torch.tensor(1.0)
    watched.remember((t,), (torch_compat._change.key(t),))
    for copied in (copy.copy(watched), copy.deepcopy(watched), pickle.loads(pickle.dumps(watched))):
        assert copied.objects == () and copied.keys is None


def test_random_batch_sizes_compile_logarithmically_through_the_callback():
    """200 batches of random sizes 1-64 per phase: the callback pads odd sizes in torch (no
    jax compile per size) and hands back exact-size tensors, as views of the padded result."""
    budget = 2 * (int(np.log2(64)) + 2)
    rng = np.random.default_rng(0)
    val = [make_outputs(i, n=int(n), boxes=False) for i, n in enumerate(rng.integers(1, 65, 200))]
    test = [make_outputs(i, n=int(n), boxes=False) for i, n in enumerate(rng.integers(1, 65, 200))]
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    with jaxnorm.testing.count_compiles() as log:
        cb.on_validation_epoch_start(None, module)
        for i, batch in enumerate(val):
            cb.on_validation_batch_end(None, module, batch, None, i)
        cb.on_validation_epoch_end(None, module)
    assert log.count <= budget, log.names
    lo, hi = reference.min_max(*[to_numpy(b)["anomaly_maps"] for b in val])
    assert module.normalization_metrics.read()["image"] == (lo, hi)
    assert cb.hook.num_values["pixel"] == sum(b["anomaly_maps"].numel() for b in val)

    raw = [to_numpy(b) for b in test]
    with jaxnorm.testing.count_compiles() as log:
        cb.on_test_start(None, module)
        for i, batch in enumerate(test):
            cb.on_test_batch_end(None, module, batch, None, i)
    assert log.count <= budget, log.names
    views = 0
    for got, want in zip(test, raw, strict=True):
        for key, t in (("pred_scores", IMAGE_T), ("anomaly_maps", PIXEL_T)):
            assert tuple(got[key].shape) == want[key].shape
            views += got[key].untyped_storage().nbytes() > got[key].nbytes
            np.testing.assert_allclose(
                got[key].numpy(), reference.normalize(want[key], t, lo, hi), atol=1e-6
            )
    # Odd sizes were padded in torch and come back as views (no jax slice, no host wait).
    assert views > 0


# -- the steady test path: what the first batch settled is not done again -----------------


@pytest.fixture
def has_plans():
    """Whether this jaxlib has the direct DLPack calls the steady path takes (jaxlib 0.6, the
    floor, has not: there every test batch takes the full path)."""
    from torch_compat import _dlpack

    torch_compat.to_jax(torch.zeros(1))  # finds the direct import, as a first batch does
    return _dlpack.batch_device_ok(torch.device("cpu"))


@pytest.fixture
def batch_exchange(has_plans):
    """Skips where this jaxlib lacks the direct DLPack calls the steady path takes."""
    if not has_plans:
        pytest.skip("this jaxlib has no direct DLPack calls: every test batch takes the full path")


def _steady_setup(monkeypatch):
    """A fitted callback, counting what a test batch does: full-path calls, imports, jitted
    calls (by wrapping the plan's function) and compiles."""
    from jaxnorm._src import fused
    from torch_compat import _dlpack

    module, cb = fitted([make_outputs(s, boxes=False) for s in range(2)])
    cb.on_test_start(None, module)
    counts = {"full": 0, "stat_tensors": 0, "imports": 0, "calls": 0, "exports": 0}
    real_positional = fused.normalize_positional

    def counted_positional(keys, rowwise):
        fn = real_positional(keys, rowwise)

        def call(*args):
            counts["calls"] += 1
            return fn(*args)

        return call

    def spy(name, real):
        return lambda *a, **k: counts.__setitem__(name, counts[name] + 1) or real(*a, **k)

    monkeypatch.setattr(fused, "normalize_positional", counted_positional)
    full = spy("full", cb.hook.adapter.normalize_batch)
    monkeypatch.setattr(cb.hook.adapter, "normalize_batch", full)
    monkeypatch.setattr(
        torch_compat._callback,
        "stat_tensors",
        spy("stat_tensors", torch_compat._callback.stat_tensors),
    )
    monkeypatch.setattr(_dlpack, "_fast_from_dlpack", spy("imports", _dlpack._fast_from_dlpack))
    monkeypatch.setattr(_dlpack, "_from_capsule", spy("exports", _dlpack._from_capsule))
    return module, cb, counts


def test_steady_test_batches_import_each_key_once_call_jax_once_and_export_once(
    monkeypatch, batch_exchange
):
    module, cb, counts = _steady_setup(monkeypatch)
    lo, hi = module.normalization_metrics.read()["image"]
    first = make_outputs(100, n=8, boxes=False)
    cb.on_test_batch_end(None, module, clone(first), None, 0)  # settles the plan
    for key in counts:
        counts[key] = 0
    batches = [make_outputs(200 + i, n=8, boxes=False) for i in range(6)]  # fresh tensors
    with jaxnorm.testing.count_compiles() as log:
        for i, raw in enumerate(batches):
            outputs = clone(raw)
            cb.on_test_batch_end(None, module, outputs, None, i)
            assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi)
    n = len(batches)
    assert log.count == 0, log.names
    assert counts == {"full": 0, "stat_tensors": 0, "imports": 2 * n, "calls": n, "exports": 2 * n}


@pytest.mark.parametrize(
    "change",
    ["size", "dtype", "boxes", "key", "threshold", "stats", "non_contiguous", "grad"],
)
def test_a_batch_that_differs_from_the_plan_takes_the_full_path(monkeypatch, change, has_plans):
    module, cb, counts = _steady_setup(monkeypatch)
    for i in range(2):
        cb.on_test_batch_end(None, module, make_outputs(300 + i, n=8, boxes=False), None, i)
    raw = make_outputs(400, n=8, boxes=False)
    image_t = IMAGE_T
    if change == "size":
        raw = make_outputs(400, n=4, boxes=False)
    elif change == "dtype":
        raw = make_outputs(400, n=8, boxes=False, dtype=torch.float64)
    elif change == "boxes":
        raw = make_outputs(400, n=8)
    elif change == "key":
        del raw["anomaly_maps"]
    elif change == "threshold":
        image_t = 0.25
        module.image_threshold.value.fill_(image_t)
    elif change == "stats":
        module.normalization_metrics.max.fill_(9.0)
    elif change == "non_contiguous":
        raw["anomaly_maps"] = raw["anomaly_maps"].transpose(2, 3)
    elif change == "grad":
        raw["pred_scores"].requires_grad_(True)
    lo, hi = module.normalization_metrics.read()["image"]
    outputs = clone(raw)
    full_before = counts["full"]
    cb.on_test_batch_end(None, module, outputs, None, 2)
    assert_matches_reference(
        {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()},
        {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in raw.items()},
        image_t,
        PIXEL_T,
        lo,
        hi,
    )
    # Changed thresholds or statistics, another size, a detached-on-the-fly tensor: a new plan
    # (no full path); a layout a plan does not take (float64, boxes, non-contiguous): the full path.
    full = {"dtype", "boxes", "non_contiguous"}
    assert counts["full"] - full_before == (change in full or not has_plans), counts


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda o: o.update(pred_scores=[0.1, 0.2]), r"outputs\['pred_scores'\]: expected a torch"),
        (lambda o: o.update(anomaly_maps=torch.empty((8, 1, 5, 5), device="meta")), "meta"),
        (lambda o: o.update(pred_scores=torch.zeros(8, dtype=torch.complex64)), "complex64"),
        (lambda o: [o.pop(k) for k in ("pred_scores", "anomaly_maps")], "No values found"),
    ],
    ids=["list", "meta", "complex", "no_keys"],
)
def test_bad_batches_after_a_plan_raise_the_full_paths_errors(bad, match, has_plans):
    module, cb = fitted([make_outputs(0, boxes=False)])
    for i in range(2):
        cb.on_test_batch_end(None, module, make_outputs(10 + i, n=8, boxes=False), None, i)
    assert cb.steady == has_plans
    outputs = make_outputs(20, n=8, boxes=False)
    bad(outputs)
    with pytest.raises((ValueError, TypeError), match=match):
        cb.on_test_batch_end(None, module, outputs, None, 2)


def test_missing_statistics_raise_on_the_first_batch_that_could_take_a_plan():
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    with pytest.raises(jaxnorm.StatisticsMissingError, match="no normalization statistics"):
        cb.on_test_batch_end(None, module, make_outputs(0, boxes=False), None, 0)
    assert not cb.steady


# -- the steady validation path ------------------------------------------------------------


def _validation_counts(monkeypatch, cb):
    """Counts full-path validation calls and batch imports of ``cb``."""
    from torch_compat import _dlpack

    counts = {"full": 0, "imports": 0}
    real_full, real_import = cb.hook.on_validation_batch_end, _dlpack.import_batch

    def full(*a, **k):
        counts["full"] += 1
        return real_full(*a, **k)

    def imports(*a, **k):
        counts["imports"] += 1
        return real_import(*a, **k)

    monkeypatch.setattr(cb.hook, "on_validation_batch_end", full)
    monkeypatch.setattr(_dlpack, "import_batch", imports)
    return counts


@pytest.mark.parametrize("stats", ["shared", "separate"])
def test_steady_validation_batches_import_once_and_fold_once(monkeypatch, stats, batch_exchange):
    module, cb = Module(), MinMaxNormalizationCallback(stats=stats)
    if stats == "separate":
        module.normalization_metrics = torch_compat.MinMax(stats="separate")
    cb.setup(None, module, "fit")
    counts = _validation_counts(monkeypatch, cb)
    batches = [make_outputs(500 + i, n=8, boxes=False) for i in range(7)]  # fresh tensors
    with jaxnorm.testing.count_compiles() as log:
        cb.on_validation_epoch_start(None, module)
        cb.on_validation_batch_end(None, module, batches[0], None, 0)  # settles the plan
        # The fold compiles for the fresh state, then once more for the state it returns.
        cb.on_validation_batch_end(None, module, batches[1], None, 1)
        settled = log.count
        for i, b in enumerate(batches[2:], 2):
            cb.on_validation_batch_end(None, module, b, None, i)
        cb.on_validation_epoch_end(None, module)
    assert counts == {"full": 1, "imports": len(batches) - 1}, counts
    assert log.count == settled, log.names  # steady batches compile nothing more
    raw = [to_numpy(b) for b in batches]
    got = module.normalization_metrics.read()
    if stats == "shared":
        assert got["image"] == reference.min_max(*[r["anomaly_maps"] for r in raw])
    else:
        assert got["image"] == reference.min_max(*[r["pred_scores"] for r in raw])
        assert got["pixel"] == reference.min_max(*[r["anomaly_maps"] for r in raw])
    assert cb.hook.num_values["pixel"] == sum(r["anomaly_maps"].size for r in raw)


def test_a_nonfinite_steady_validation_batch_raises_at_epoch_end():
    batches = [make_outputs(600 + i, n=8, boxes=False) for i in range(4)]
    batches[2]["anomaly_maps"][1, 0, 0, :3] = math.nan
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    cb.on_validation_epoch_start(None, module)
    for i, b in enumerate(batches):
        cb.on_validation_batch_end(None, module, b, None, i)
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="3 non-finite.*'anomaly_maps'") as e:
        cb.on_validation_epoch_end(None, module)
    assert "validation batch 2" in str(e.value)
    clean = [to_numpy(b)["anomaly_maps"] for i, b in enumerate(batches) if i != 2]
    assert module.normalization_metrics.read()["image"] == reference.min_max(*clean)
    # "omit": the same batches fold their finite values
    module, cb = fitted(batches, nonfinite="omit")
    maps = np.concatenate([to_numpy(b)["anomaly_maps"].ravel() for b in batches])
    assert module.normalization_metrics.read()["image"] == reference.min_max(
        maps[np.isfinite(maps)]
    )
    assert cb.hook.num_nonfinite["image"] == 3


@pytest.mark.parametrize(
    "change", ["size", "dtype", "boxes", "maps_gone", "scores_gone", "non_contiguous", "grad"]
)
def test_a_validation_batch_that_differs_from_the_plan_is_folded_right(
    monkeypatch, change, has_plans
):
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    counts = _validation_counts(monkeypatch, cb)
    first = [make_outputs(700 + i, n=8, boxes=False) for i in range(2)]
    raw = make_outputs(800, n=8, boxes=False, scale=5.0)
    if change == "size":
        raw = make_outputs(800, n=4, boxes=False, scale=5.0)
    elif change == "dtype":
        raw = make_outputs(800, n=8, boxes=False, scale=5.0, dtype=torch.float64)
    elif change == "boxes":
        raw = make_outputs(800, n=8, scale=5.0)
    elif change == "maps_gone":
        del raw["anomaly_maps"]  # the statistics now come from pred_scores
    elif change == "scores_gone":
        del raw["pred_scores"]
    elif change == "non_contiguous":
        raw["anomaly_maps"] = raw["anomaly_maps"].transpose(2, 3)
    elif change == "grad":
        raw["anomaly_maps"].requires_grad_(True)
    validate(cb, module, [*first, raw])
    want = reference.min_max(*[reference.stats_source(to_numpy(b)) for b in [*first, raw]])
    assert module.normalization_metrics.read()["image"] == pytest.approx(want, rel=1e-7)
    # A changed layout leaves the plan (boxes, float64, non-contiguous, another key set,
    # another size); a tensor that requires grad is the same layout, detached.
    # The first batch settles the plan and the second takes it; without the direct DLPack
    # calls (the floor) every batch takes the full path.
    full = (1 if change == "grad" else 2) if has_plans else 3
    assert counts["full"] == full, counts
