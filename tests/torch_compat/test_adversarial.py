"""MinMaxNormalizationCallback against adversarial tensors and callers, driven by hand.

Each test pins a behaviour anomalib 0.7's callback has (it reads every tensor eagerly, on
every batch): odd memory layouts and dtypes give anomalib's values, dtype and device; writes
to thresholds and statistics that torch's version counter misses are seen; a tensor written
in place right after a validation hook returns was folded as it was when handed over.
Values are checked against the numpy reference (tests/reference.py), never the callback.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import compat, reference
from tests.torch_compat import module_protocol as h
from tests.torch_compat import test_lightning as lt
from torch_compat import _dlpack

IMAGE_T, PIXEL_T = h.IMAGE_T, h.PIXEL_T


def lt_marks(test):
    """The Lightning test module's warning filters (advice meant for real training runs)."""
    for mark in lt.pytestmark:
        test = mark(test)
    return test


def _settled(n=8):
    """A fitted module and callback that normalized two test batches (a plan, where the
    direct DLPack calls exist)."""
    module, cb = h.fitted([h.make_outputs(s, n=n, boxes=False) for s in range(2)])
    cb.on_test_start(None, module)
    for i in range(2):
        cb.on_test_batch_end(None, module, h.make_outputs(10 + i, n=n, boxes=False), None, i)
    return module, cb


def _normalize_and_check(module, cb, seed=99):
    """Normalizes a fresh batch; checks it against the reference with the module's values
    as they are now."""
    lo, hi = (float(module.normalization_metrics.min), float(module.normalization_metrics.max))
    image_t = float(module.image_threshold.value)
    pixel_t = float(module.pixel_threshold.value)
    raw = h.make_outputs(seed, n=8, boxes=False)
    outputs = h.clone(raw)
    cb.on_test_batch_end(None, module, outputs, None, 9)
    h.assert_matches_reference(outputs, raw, image_t, pixel_t, lo, hi)


# -- writes to thresholds and statistics that the version counter does not see --------------


def _data_swap(m):
    m.image_threshold.value.data = torch.tensor(0.25)  # new storage, same tensor object


def _write_through_data(m):
    m.pixel_threshold.value.data.fill_(-0.5)  # `.data` shares no version counter


def _numpy_alias(m):
    m.normalization_metrics.max.numpy()[...] = 40.0


def _stats_data_swap(m):
    m.normalization_metrics.min.data = torch.tensor(-30.0)


def _inference_write(m):
    with torch.inference_mode():
        value = torch.tensor(0.1)
    m.image_threshold.value = value
    with torch.inference_mode():
        value.fill_(2.0)  # inference tensors keep no version counter at all


@pytest.mark.parametrize(
    "write",
    [_data_swap, _write_through_data, _numpy_alias, _stats_data_swap, _inference_write],
    ids=["data_swap", "through_data", "numpy_alias", "stats_data_swap", "inference"],
)
def test_writes_the_version_counter_misses_are_seen(write):
    module, cb = _settled()
    if write is _inference_write:
        write(module)  # replaced (seen by identity), then written without a version
        _normalize_and_check(module, cb, seed=98)
    else:
        write(module)
    _normalize_and_check(module, cb)


def test_an_inference_mode_threshold_keeps_the_steady_path(has_plans):
    """anomalib's adaptive threshold (``self.value = thresholds[argmax(f1)]``) is made in
    Lightning's evaluation loop, under inference mode: test batches still take a plan."""
    module, cb = h.fitted([h.make_outputs(s, n=8, boxes=False) for s in range(2)])
    with torch.inference_mode():
        module.image_threshold.value = torch.linspace(0, 2, 5)[torch.tensor(3)]
    cb.on_test_start(None, module)
    for i in range(3):
        _normalize_and_check(module, cb, seed=20 + i)
    assert cb.steady == has_plans


# -- validation: the tensors handed over are folded as they were --------------------------


@pytest.mark.parametrize("path", ["steady", "full"])
def test_a_validation_tensor_written_in_place_after_the_hook(path, monkeypatch):
    """One buffer, written with each batch's maps before the hook and overwritten right
    after it returns (a model reusing its output buffer; the same tensor sent again):
    anomalib's synchronous update folds what was handed over, and so must the callback,
    whose fold reads the tensor zero-copy and asynchronously."""
    g = torch.Generator().manual_seed(0)
    sources = [torch.rand((16, 1, 192, 192), generator=g) * (i + 1) for i in range(8)]
    buffer = torch.empty_like(sources[0])
    scores = torch.empty(16)
    outputs = {"anomaly_maps": buffer, "pred_scores": scores}
    if path == "full":  # as where jaxlib lacks the steady path's calls (the floor)
        monkeypatch.setattr(_dlpack, "batch_device_ok", lambda device: False)
    module, cb = h.Module(), h.MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    cb.on_validation_epoch_start(None, module)
    for i, source in enumerate(sources):
        buffer.copy_(source)
        scores.copy_(source.flatten(1).amax(1))
        cb.on_validation_batch_end(None, module, outputs, None, i)
        buffer.fill_(1e6)  # the caller's next write, before jax may have read it
        scores.fill_(1e6)
    cb.on_validation_epoch_end(None, module)
    want = reference.min_max(*[s.numpy() for s in sources])
    assert module.normalization_metrics.read()["image"] == pytest.approx(want, rel=1e-7)


# -- odd tensors: anomalib's values, dtype and device, inputs left as they were -----------


def _channels_last(o):
    o["anomaly_maps"] = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)


def _channels_last_one_channel(o):
    o["anomaly_maps"] = o["anomaly_maps"].contiguous(memory_format=torch.channels_last)


def _expanded(o):
    o["anomaly_maps"] = o["anomaly_maps"][:1].expand(8, 1, 5, 5)  # stride 0
    o["pred_scores"] = o["pred_scores"][:1].expand(8)


def _storage_offset(o):
    # contiguous views that do not start on a 64-byte boundary (jax copies those)
    o["pred_scores"] = torch.cat([torch.zeros(1), o["pred_scores"]])[1:]
    o["anomaly_maps"] = torch.cat([torch.zeros(3), o["anomaly_maps"].ravel()])[3:].view(8, 1, 5, 5)


def _sliced(o):
    o["anomaly_maps"] = torch.cat([o["anomaly_maps"]] * 2, dim=3)[..., ::2]
    o["pred_scores"] = torch.stack([o["pred_scores"]] * 2, dim=1)[:, 1]


def _column_scores(o):
    o["pred_scores"] = o["pred_scores"][:, None].clone()  # (N, 1)
    o["anomaly_maps"] = o["anomaly_maps"][:, 0].clone()  # (N, H, W)


def _odd_strides(o):
    # contiguous, with an arbitrary stride on the size-1 axis
    t = torch.empty_strided((8, 1, 5, 5), (25, 7, 5, 1))
    t.copy_(o["anomaly_maps"])
    o["anomaly_maps"] = t


def _same_tensor_two_keys(o):
    o["anomaly_maps"] = o["pred_scores"]


def _zero_rows(o):
    o["pred_scores"], o["anomaly_maps"] = o["pred_scores"][:0], o["anomaly_maps"][:0]


def _one_row(o):
    o["pred_scores"], o["anomaly_maps"] = o["pred_scores"][:1], o["anomaly_maps"][:1]


def _as(dtype):
    def cast(o):
        o["pred_scores"], o["anomaly_maps"] = (
            (o[k] * 4).to(dtype) for k in ("pred_scores", "anomaly_maps")
        )

    cast.__name__ = f"_{dtype}".replace("torch.", "")
    return cast


ODD = [
    _channels_last,
    _channels_last_one_channel,
    _expanded,
    _storage_offset,
    _sliced,
    _column_scores,
    _odd_strides,
    _same_tensor_two_keys,
    _zero_rows,
    _one_row,
    *(_as(dt) for dt in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)),
]


def _anomalib_dtype(t: torch.Tensor) -> torch.dtype:
    # (t - 0-d float32 threshold) / ...: floats keep their dtype, integers become float32
    return t.dtype if t.is_floating_point() else torch.float32


@pytest.mark.parametrize("odd", ODD, ids=lambda f: f.__name__.strip("_"))
def test_odd_tensors_give_anomalibs_values_dtype_and_device(odd):
    """Three batches of each (the first settles a plan where one is possible, the later
    ones take it): values, dtype, shape and device as anomalib's callback gives them."""
    module, cb = h.fitted([h.make_outputs(s, n=8, boxes=False) for s in range(2)])
    lo, hi = module.normalization_metrics.read()["image"]
    cb.on_test_start(None, module)
    for i in range(3):
        outputs = h.make_outputs(30 + i, n=8, boxes=False)
        del outputs["label"]
        odd(outputs)
        raw = dict(outputs)
        copies = {k: v.clone() for k, v in raw.items()}
        cb.on_test_batch_end(None, module, outputs, None, i)
        for key, t in raw.items():
            assert torch.equal(t, copies[key]), f"{key} was written"
            threshold = IMAGE_T if key == "pred_scores" else PIXEL_T
            got = outputs[key]
            assert got.dtype == _anomalib_dtype(t), key
            assert got.shape == t.shape and got.device == t.device, key
            np.testing.assert_allclose(
                got.double().numpy(),
                reference.normalize(t.double().numpy(), threshold, lo, hi),
                atol=4e-3 if t.dtype in (torch.float16, torch.bfloat16) else 1e-6,
                err_msg=key,
            )


# -- box scores of other shapes, and a tensor in place of the list --------------------------


def test_box_entries_of_any_shape_come_back_in_their_shape():
    """anomalib concatenates (k,) and (k, 1) entries alike (torch.cat) and normalizes each
    entry as it is: a 0-d entry stays 0-d."""
    boxes = [torch.rand(2, 1) * 3, torch.rand(0, 1), torch.rand(()) * 3, torch.rand(3) * 3]
    val = {"pred_scores": torch.rand(4), "box_scores": [b.clone() for b in boxes]}
    module, cb = h.fitted([val])
    lo, hi = reference.min_max(*[b.numpy() for b in boxes])
    assert module.normalization_metrics.read()["image"] == pytest.approx((lo, hi), rel=1e-7)
    cb.on_test_start(None, module)
    outputs = {"pred_scores": torch.rand(4), "box_scores": [b.clone() for b in boxes]}
    cb.on_test_batch_end(None, module, outputs, None, 0)
    for got, b in zip(outputs["box_scores"], boxes, strict=True):
        assert got.shape == b.shape and got.dtype == b.dtype
        np.testing.assert_allclose(
            got.numpy(), reference.normalize(b.numpy(), PIXEL_T, lo, hi), atol=1e-6
        )


def test_a_box_scores_tensor_instead_of_a_list_is_named_as_such():
    module, cb = h.fitted([h.make_outputs(0)])
    outputs = {"pred_scores": torch.rand(4), "box_scores": torch.rand(4, 3)}
    with pytest.raises(ValueError, match=r"got one tensor of shape \(4, 3\); wrap the"):
        cb.on_validation_batch_end(None, module, outputs, None, 0)
    with pytest.raises(ValueError, match=r"got one tensor of shape \(4, 3\); wrap the"):
        cb.on_test_batch_end(None, module, outputs, None, 0)


# -- thresholds that are not tensors --------------------------------------------------------


class _Plain:
    """A threshold object whose ``value`` is whatever it is given (not an nn.Module)."""

    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize("value", [0.25, 2, np.float32(0.75)], ids=["float", "int", "numpy"])
def test_number_thresholds_are_read_once_and_keep_the_steady_path(value, has_plans):
    module, cb = h.fitted([h.make_outputs(s, n=8, boxes=False) for s in range(2)])
    del module.image_threshold
    module.image_threshold = _Plain(value)
    cb.on_test_start(None, module)
    for i in range(3):
        _normalize_and_check(module, cb, seed=40 + i)
    assert cb.steady == has_plans
    module.image_threshold.value = 1.75  # a new value: seen at the next batch
    _normalize_and_check(module, cb, seed=50)


@pytest.mark.parametrize(
    "value",
    [torch.tensor(float("nan")), torch.tensor(-float("inf")), torch.tensor(1e300).double(), True],
    ids=["nan", "inf", "beyond_float32", "bool"],
)
def test_unusable_thresholds_name_where_they_came_from(value):
    module, cb = h.fitted([h.make_outputs(0)])
    del module.pixel_threshold
    module.pixel_threshold = _Plain(value)
    with pytest.raises(ValueError, match=r"^pl_module\.pixel_threshold\.value: "):
        cb.on_test_batch_end(None, module, h.make_outputs(1), None, 0)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device and a CUDA build of torch"
)
@pytest.mark.filterwarnings("ignore::torch_compat.HostCopyWarning")
def test_cuda_validation_tensor_written_right_after_the_hook():
    """On CUDA, torch's stream waits for the fold before its next write (no host wait): the
    fold, queued behind a slow torch producer, still reads what was handed over."""
    g = torch.Generator().manual_seed(0)
    sources = [(torch.rand((16, 1, 256, 256), generator=g) * (i + 1)).cuda() for i in range(4)]
    buffer = torch.empty_like(sources[0])
    module, cb = h.Module().cuda(), h.MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    cb.on_validation_epoch_start(None, module)
    for i, source in enumerate(sources):
        torch.cuda._sleep(50_000_000)  # the fold starts well after the hook returns
        buffer.copy_(source)
        cb.on_validation_batch_end(None, module, {"anomaly_maps": buffer}, None, i)
        buffer.fill_(1e6)
    cb.on_validation_epoch_end(None, module)
    want = reference.min_max(*[s.cpu().numpy() for s in sources])
    assert module.normalization_metrics.read()["image"] == pytest.approx(want, rel=1e-7)


def test_jax_is_never_handed_misaligned_cpu_memory(monkeypatch):
    """A view with a storage offset is copied by torch before jax sees it: jax would copy it
    anyway, and jaxlib 0.6/0.7 log a warning for each such tensor, at every batch."""
    handed = []

    def spy(real):
        def record(t, *args):
            handed.append(t.data_ptr() % _dlpack.CPU_ALIGNMENT)
            return real(t, *args)

        return record

    monkeypatch.setattr(_dlpack, "_to_capsule", spy(_dlpack._to_capsule))  # the steady path
    monkeypatch.setattr(_dlpack, "_from_dlpack", spy(_dlpack._from_dlpack))  # to_jax
    batches = []
    for seed in range(4):
        outputs = h.make_outputs(seed, n=8, boxes=False)
        _storage_offset(outputs)
        batches.append(outputs)
    module, cb = h.fitted(batches[:2])
    want = reference.min_max(*[b["anomaly_maps"].numpy() for b in batches[:2]])
    assert module.normalization_metrics.read()["image"] == pytest.approx(want, rel=1e-7)
    for i, outputs in enumerate(batches[2:]):
        cb.on_test_batch_end(None, module, outputs, None, i)
    assert handed and not any(handed), handed


# -- through a real Trainer -----------------------------------------------------------------


class _ReusingLogic:
    """A module that writes every validation step's maps into one buffer, and clears the
    buffer in its own ``on_validation_batch_end`` (Lightning calls it right after the
    callbacks'); that sets an adaptive image threshold in inference mode at validation
    epoch end, as anomalib's ``AnomalyScoreThreshold.compute`` does; and that tests and
    predicts on two dataloaders of different layouts (maps and scores; scores only)."""

    def __init__(self):
        super().__init__(n_batches=3)
        self.buffer = torch.zeros((8, 1, 96, 96))
        self.handed: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(batch_idx)
        self.buffer.copy_(torch.randn(self.buffer.shape, generator=g) * (batch_idx + 1))
        self.handed.append(self.buffer.clone())
        return {"anomaly_maps": self.buffer, "pred_scores": self.buffer.amax((1, 2, 3))}

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.buffer.fill_(1e6)  # the model's scratch space, reused at once

    def on_validation_epoch_end(self):
        self.image_threshold.value = torch.linspace(0, 2, 5)[torch.tensor(3)]  # 1.5

    def _layout(self, key, seed, dataloader_idx):
        outputs = h.make_outputs(seed, n=4, scale=4.0, boxes=False)
        if dataloader_idx == 1:
            del outputs["anomaly_maps"]
        self.raw.setdefault(key, []).append(h.clone(outputs))
        return outputs

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return self._layout(("test", 0), 100 * dataloader_idx + batch_idx, dataloader_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self._layout(("predict", 0), 50 + 100 * dataloader_idx + batch_idx, dataloader_idx)

    def test_dataloader(self):
        return [self._indices(), self._indices()]

    predict_dataloader = test_dataloader


@lt_marks
def test_a_trainer_with_a_reused_buffer_an_inference_threshold_and_two_layouts():
    ns = lt.namespace(compat.ANY_NAMESPACE)
    module = type("Reusing", (_ReusingLogic, ns.Module), {})()
    recorder = ns.Recorder()
    trainer = ns.Trainer(**lt.TRAINER, callbacks=[ns.Callback(), recorder])
    trainer.validate(module, verbose=False)
    lo, hi = reference.min_max(*[t.numpy() for t in module.handed])
    assert module.normalization_metrics.read()["image"] == pytest.approx((lo, hi), rel=1e-7)
    assert module.image_threshold.value.is_inference()

    trainer.test(module, verbose=False)
    assert len(recorder.tested) == 6
    for got, raw in zip(recorder.tested, module.raw[("test", 0)], strict=True):
        h.assert_matches_reference(got, raw, 1.5, PIXEL_T, lo, hi)
    predicted = [p for per_loader in trainer.predict(module) for p in per_loader]
    assert len(predicted) == 6
    for got, raw in zip(predicted, module.raw[("predict", 0)], strict=True):
        h.assert_matches_reference(got, raw, 1.5, PIXEL_T, lo, hi)
