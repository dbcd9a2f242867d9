"""The caches of the Lightning callback never outlive the values they stand for
(torch_compat._change): driven by hand, with every way a value can change.

On the CPU a cache is keyed by values; an accelerator is stood in for by making
``_change.on_host`` say no, so that the values travel with each batch and only the checks are
keyed. Oracle: the numpy reference of SPEC section 1.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

import jaxnorm
import torch_compat._change
from tests import reference
from tests.torch_compat.module_protocol import (
    IMAGE_T,
    PIXEL_T,
    Module,
    assert_matches_reference,
    clone,
    fitted,
    make_outputs,
    to_numpy,
    validate,
)
from torch_compat.pytorch_lightning import MinMaxNormalizationCallback


@pytest.fixture(params=["cpu", "accelerator"])
def where(request, monkeypatch):
    """The CPU rule (values read and keyed), or an accelerator's (values travel)."""
    if request.param == "accelerator":
        monkeypatch.setattr(torch_compat._change, "on_host", lambda t: False)
    return request.param


def stats_of(batches):
    return reference.min_max(*[reference.stats_source(to_numpy(b)) for b in batches])


@pytest.mark.parametrize("test_start", [True, False], ids=["on_test_start", "batches only"])
def test_an_abandoned_validation_epoch_does_not_leak_into_test(where, test_start):
    """Driven by hand: fit, then a second validation epoch folds one batch and is abandoned;
    test batches must use the statistics of the last completed epoch (anomalib 0.7 reads
    normalization_metrics), not the hook's partial ones. Without on_test_start, only the
    rule "the hook still holds what was loaded" (hook.stats) sees it."""
    val = [make_outputs(s, boxes=False) for s in range(2)]
    module, cb = fitted([clone(b) for b in val])
    lo, hi = stats_of(val)
    for i in range(2):  # steady test batches: the caches are warm
        cb.on_test_batch_end(None, module, make_outputs(10 + i, n=4, boxes=False), None, i)
    cb.on_validation_epoch_start(None, module)  # a new epoch ...
    partial = make_outputs(20, scale=9.0, boxes=False)
    cb.on_validation_batch_end(None, module, partial, None, 0)  # ... abandoned after a batch
    assert stats_of([partial]) != (lo, hi)
    if test_start:
        cb.on_test_start(None, module)
    for i in range(3):
        raw = make_outputs(30 + i, n=4, boxes=False)
        outputs = clone(raw)
        cb.on_test_batch_end(None, module, outputs, None, i)
        assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi)


def test_thresholds_set_on_the_hook_by_hand_are_replaced_by_the_modules(where):
    module, cb = fitted([make_outputs(0, boxes=False)])
    lo, hi = module.normalization_metrics.read()["image"]
    cb.on_test_batch_end(None, module, make_outputs(1, n=4, boxes=False), None, 0)
    cb.hook.image_threshold = 9.0  # the hook no longer holds pl_module's threshold
    raw = make_outputs(2, n=4, boxes=False)
    outputs = clone(raw)
    cb.on_test_batch_end(None, module, outputs, None, 1)
    assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi)


@pytest.mark.parametrize("write", ["fill_", "data.fill_"])
def test_statistics_written_after_the_missing_statistics_error_are_used(where, write):
    """No statistics yet: the first test batch raises StatisticsMissingError. Statistics
    written then (on an accelerator, ``.data`` leaves every key as it was) are used by the
    next batch: the error is never a cached result (found by the 0.x callback's machine)."""
    module = Module()
    cb = MinMaxNormalizationCallback()
    cb.setup(None, module, "test")
    with pytest.raises(jaxnorm.StatisticsMissingError):
        cb.on_test_batch_end(None, module, make_outputs(0, n=2, boxes=False), None, 0)
    metrics = module.normalization_metrics
    for tensor, value in ((metrics.min, -0.5), (metrics.max, 1.5)):
        (tensor.data if write == "data.fill_" else tensor).fill_(value)
    raw = make_outputs(1, n=2, boxes=False)
    outputs = clone(raw)
    cb.on_test_batch_end(None, module, outputs, None, 1)
    assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, -0.5, 1.5)


WRITES = {
    "fill_": lambda t, v: t.fill_(v),
    "data.fill_": lambda t, v: t.data.fill_(v),
    "numpy alias": lambda t, v: t.numpy().__setitem__(..., v),
    "dlpack alias": lambda t, v: torch.from_dlpack(t).fill_(v),
    "data =": lambda t, v: setattr(t, "data", torch.full_like(t, v)),
    "inference mode": None,  # the tensor made under inference_mode, written there
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("target", ["max", "image_threshold"])
def test_every_write_to_a_source_is_seen_by_the_next_test_batch(where, write, target):
    if write == "inference mode":
        with torch.inference_mode():
            module = Module(image_threshold=torch.tensor(IMAGE_T).item())
            module.image_threshold.value = torch.tensor(IMAGE_T)
        cb = MinMaxNormalizationCallback()
        cb.setup(None, module, "fit")
        validate(cb, module, [make_outputs(0, boxes=False)])
        with torch.inference_mode():
            metrics = module.normalization_metrics
            metrics.max = torch.tensor(metrics.max.item())
    else:
        module, cb = fitted([make_outputs(0, boxes=False)])
    lo, hi = module.normalization_metrics.read()["image"]
    for i in range(3):  # settles the steady path
        cb.on_test_batch_end(None, module, make_outputs(10 + i, n=4, boxes=False), None, i)
    tensor = module.normalization_metrics.max if target == "max" else module.image_threshold.value
    value = hi + 2.5 if target == "max" else 0.25
    if write == "inference mode":
        with torch.inference_mode():
            tensor.fill_(value)
    else:
        WRITES[write](tensor, value)
    image_t = value if target == "image_threshold" else IMAGE_T
    hi = value if target == "max" else hi
    for i in range(2):
        raw = make_outputs(20 + i, n=4, boxes=False)
        outputs = clone(raw)
        cb.on_test_batch_end(None, module, outputs, None, i)
        assert_matches_reference(outputs, raw, image_t, PIXEL_T, lo, hi)


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_copy_of_the_callback_reads_its_module_again(how):
    """A copy holds no cache of the original: it reads the module it is given."""
    module, cb = fitted([make_outputs(0, boxes=False)])
    for i in range(2):
        cb.on_test_batch_end(None, module, make_outputs(10 + i, n=4, boxes=False), None, i)
    copied = {
        "deepcopy": copy.deepcopy,
        "copy": copy.copy,
        "pickle": lambda c: pickle.loads(pickle.dumps(c)),
    }[how](cb)
    other = Module(image_threshold=0.1)
    other_val = [make_outputs(5, scale=3.0, boxes=False)]
    other.normalization_metrics = copy.deepcopy(module.normalization_metrics)
    validate(copied, other, other_val)
    lo, hi = stats_of(other_val)
    raw = make_outputs(30, n=4, boxes=False)
    outputs = clone(raw)
    copied.on_test_batch_end(None, other, outputs, None, 0)
    assert_matches_reference(outputs, raw, 0.1, PIXEL_T, lo, hi)


def test_on_an_accelerator_values_travel_and_only_the_checks_are_read(monkeypatch):
    """Stood-in accelerator: a steady batch reads no threshold or statistic on the host, yet
    a write the keys cannot see (through .data) is used by the next batch."""
    monkeypatch.setattr(torch_compat._change, "on_host", lambda t: False)
    module, cb = fitted([make_outputs(0, boxes=False)])
    lo, hi = module.normalization_metrics.read()["image"]
    for i in range(2):
        cb.on_test_batch_end(None, module, make_outputs(10 + i, n=4, boxes=False), None, i)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or real_item(t))
    module.normalization_metrics.max.data.fill_(hi + 1.0)  # no version bump, same storage
    raw = make_outputs(20, n=4, boxes=False)
    outputs = clone(raw)
    cb.on_test_batch_end(None, module, outputs, None, 0)
    assert reads == []  # nothing read on the host ...
    assert_matches_reference(outputs, raw, IMAGE_T, PIXEL_T, lo, hi + 1.0)  # ... yet seen


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device and a CUDA build of torch"
)
@pytest.mark.filterwarnings("ignore::torch_compat.HostCopyWarning")
@pytest.mark.parametrize("write", ["data.fill_", "inference mode"])
def test_cuda_sources_written_unseen_by_their_keys_travel_with_the_next_batch(write):
    """On a real GPU: thresholds and statistics on the module's device travel with each
    batch, so a write that leaves their keys as they were is used by the next batch."""
    module, cb = Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    module.cuda()  # thresholds and normalization_metrics on the GPU
    val = {k: v.cuda() for k, v in make_outputs(0, n=8, boxes=False).items()}
    validate(cb, module, [val])
    lo, hi = module.normalization_metrics.read()["image"]
    for i in range(3):
        batch = {k: v.cuda() for k, v in make_outputs(10 + i, n=8, boxes=False).items()}
        cb.on_test_batch_end(None, module, batch, None, i)
    if write == "inference mode":
        with torch.inference_mode():
            module.normalization_metrics.max.fill_(hi + 1.0)
    else:
        module.normalization_metrics.max.data.fill_(hi + 1.0)
    raw = make_outputs(20, n=8, boxes=False)
    outputs = {k: raw[k].cuda() for k in ("anomaly_maps", "pred_scores")}
    cb.on_test_batch_end(None, module, outputs, None, 0)
    got = {k: v.cpu() for k, v in outputs.items()}
    assert_matches_reference(got, {k: raw[k] for k in got}, IMAGE_T, PIXEL_T, lo, hi + 1.0)


# -- keys: what is read again, and when ---------------------------------------------------


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
