"""The 1.x callback's caches never outlive the values they stand for (``torch_compat._change``),
driven by hand on ``stand_in.Model`` with every way a value can change, for the installed
design.

On the CPU a cache is keyed by values; an accelerator is stood in for as in the main suite
(tests/torch_compat/test_change.py): ``_change.on_host`` says no, so the values travel with
each batch and only the checks are keyed. Oracle: the numpy reference of SPEC section 1
(``tests/reference.py``) with the values the module holds.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import stand_in
import torch
from stand_in import BOX, IMAGE, IMAGE_T, PER_OUTPUT, PIXEL, PIXEL_T, Model

import jaxnorm
import torch_compat._change
from tests import reference, tensor_writes
from torch_compat.anomalib1 import BoxScoresWarning, MinMaxNormalizationCallback

ATOL = 1.2e-7  # one float32 ulp of 0.5 (jaxnorm multiplies by the reciprocal of the range)


@pytest.fixture(params=["cpu", "accelerator"])
def where(request, monkeypatch):
    """The CPU rule (values read and keyed), or an accelerator's (values travel)."""
    if request.param == "accelerator":
        monkeypatch.setattr(torch_compat._change, "on_host", lambda t: False)
    return request.param


def outputs(seed, n=4, scale=1.0, boxes=False):
    g = torch.Generator().manual_seed(seed)
    maps = scale * (torch.rand(n, 1, 8, 8, generator=g) * 3.0 - 1.0)
    scores = scale * (torch.rand(n, generator=g) * 3.0 - 1.0)  # across the maps' range
    out = {"anomaly_maps": maps, "pred_scores": scores}
    if boxes:
        out["box_scores"] = [scale * torch.randn(k, generator=g) for k in (2, 0, 3, 1)[:n]]
    return out


def clone(batch):
    return {
        k: [b.clone() for b in v] if isinstance(v, list) else v.clone() for k, v in batch.items()
    }


def validate(cb, module, batches):
    cb.on_validation_epoch_start(None, module)
    for i, b in enumerate(batches):
        cb.on_validation_batch_end(None, module, b, None, i)
    cb.on_validation_epoch_end(None, module)


def fitted(*, boxes=False, scale=1.0):
    """A validated module whose thresholds lie inside its statistics' ranges (as adaptive
    thresholds do), so that every value changes some normalized outputs."""
    module, cb = Model().attach(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    validate(cb, module, [outputs(s, scale=scale, boxes=boxes) for s in range(2)])
    centre_thresholds(module)
    return module, cb


def centre_thresholds(module):
    for path, prefix in ((IMAGE_T, IMAGE), (PIXEL_T, PIXEL)):
        stand_in.tensor(module, path).fill_(sum(stand_in.pair(module, prefix)) / 2)


def expected(module, raw):
    """SPEC section 1 with what ``module`` holds now: scores with the image threshold and
    statistics, maps and box scores with the pixel ones."""
    image_t, pixel_t = stand_in.value(module, IMAGE_T), stand_in.value(module, PIXEL_T)
    out = {
        "pred_scores": reference.normalize(
            raw["pred_scores"], image_t, *stand_in.pair(module, IMAGE)
        ),
        "anomaly_maps": reference.normalize(
            raw["anomaly_maps"], pixel_t, *stand_in.pair(module, PIXEL)
        ),
    }
    if "box_scores" in raw:
        lo, hi = stand_in.pair(module, BOX)
        out["box_scores"] = [
            np.full(b.shape, 0.5)
            if (lo, hi) == stand_in.EMPTY
            else reference.normalize(b, pixel_t, lo, hi)
            for b in raw["box_scores"]
        ]
    return out


def assert_normalized(got, raw, want):
    for key, w in want.items():
        pairs = (
            zip(got[key], raw[key], w, strict=True)
            if key == "box_scores"
            else [(got[key], raw[key], w)]
        )
        if key != "box_scores":  # a test that sees only clipped values could miss a write
            assert ((w > 0) & (w < 1)).any(), (key, w)
        for g, r, e in pairs:
            assert g.dtype == r.dtype and g.shape == r.shape, (key, g.dtype, g.shape)
            np.testing.assert_allclose(g.numpy(), e, rtol=0, atol=ATOL, err_msg=key)


def check_batches(cb, module, seeds, *, predict=False, boxes=False):
    """Test (or predict) batches, each against the reference with the module's values."""
    hook = cb.on_predict_batch_end if predict else cb.on_test_batch_end
    for i, seed in enumerate(seeds):
        raw = outputs(seed, boxes=boxes)
        batch = clone(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BoxScoresWarning)  # said once; test_hooks checks it
            hook(None, module, batch, None, i)
        assert_normalized(batch, raw, expected(module, raw))


def settle(cb, module):
    """Steady test batches: the caches are warm (and the steady path holds a plan, see
    ``test_test_batches_take_the_steady_path``)."""
    cb.on_test_start(None, module)
    check_batches(cb, module, range(10, 13))


def test_test_batches_take_the_steady_path(where):
    """On the CPU the plan holds the hook's parameters, on an accelerator their tensors,
    whose values travel with each batch: both have a plan."""
    module, cb = fitted()
    settle(cb, module)
    assert cb.steady


# -- writes to the thresholds and statistics ----------------------------------------------


TARGETS = {  # what is written, and its new value from the range (lo, hi) of the statistics
    "image threshold": (IMAGE_T, IMAGE, lambda lo, hi: lo + 0.3 * (hi - lo)),
    "pixel threshold": (PIXEL_T, PIXEL, lambda lo, hi: lo + 0.7 * (hi - lo)),
    "image min": (IMAGE + "min", IMAGE, lambda lo, hi: lo - 0.5 * (hi - lo)),
    "image max": (IMAGE + "max", IMAGE, lambda lo, hi: hi + (hi - lo)),
    "pixel max": (PIXEL + "max", PIXEL, lambda lo, hi: hi + 0.5 * (hi - lo)),
}


@pytest.mark.parametrize("method", tensor_writes.METHODS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_write_to_a_source_is_seen_by_the_next_test_batch(where, target, method):
    module, cb = fitted()
    settle(cb, module)
    path, prefix, new = TARGETS[target]
    owner, name = tensor_writes.resolve(module, path)
    tensor_writes.write(owner, name, new(*stand_in.pair(module, prefix)), method)
    check_batches(cb, module, range(20, 23))
    check_batches(cb, module, range(30, 32), predict=True)


def test_on_an_accelerator_steady_batches_read_nothing_yet_see_unkeyed_writes(monkeypatch):
    """Stood-in accelerator: the steady path holds a plan, a steady batch reads no threshold
    or statistic on the host, yet a write its keys cannot see (through .data) is used."""
    monkeypatch.setattr(torch_compat._change, "on_host", lambda t: False)
    module, cb = fitted()
    settle(cb, module)
    hi = stand_in.value(module, IMAGE + "max")
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or real_item(t))
    stand_in.tensor(module, IMAGE + "max").data.fill_(hi + 1.0)  # no version bump, same storage
    raw = outputs(20)
    batch = clone(raw)
    cb.on_test_batch_end(None, module, batch, None, 0)
    assert reads == []  # nothing read on the host ...
    monkeypatch.undo()
    assert_normalized(batch, raw, expected(module, raw))  # ... yet seen
    assert cb.steady


@pytest.mark.parametrize("assign", [False, True], ids=["anomalib's load_state_dict", "assign=True"])
def test_a_loaded_state_dict_is_used_by_the_next_test_batch(where, assign):
    module, cb = fitted()
    settle(cb, module)
    state = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()
    }
    state[IMAGE_T] = torch.tensor(0.5)
    state[IMAGE + "max"] = state[IMAGE + "max"] + 3.0
    state[PIXEL + "min"] = state[PIXEL + "min"] - 0.5
    if assign:  # AnomalyModule.load_state_dict takes no assign: torch's, without the class keys
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        torch.nn.Module.load_state_dict(module, state, assign=True)
    else:  # anomalib's: new threshold and MinMax instances, then torch's
        module.load_state_dict(state)
    check_batches(cb, module, range(20, 23))


def test_new_metric_objects_are_used_by_the_next_test_batch(where):
    """What anomalib's load_state_dict puts there, by hand: a new collection (or MinMax)."""
    module, cb = fitted()
    settle(cb, module)
    other = Model().attach()
    validate(MinMaxNormalizationCallback(), other, [outputs(7, scale=4.0)])
    module.normalization_metrics = other.normalization_metrics
    check_batches(cb, module, range(20, 23))


@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16, torch.float64])
def test_a_dtype_conversion_of_the_module_is_used_by_the_next_test_batch(where, to):
    """``module.to(dtype)`` (Lightning's "16-true"/"bf16-true"/"64-true") rounds the states
    it converts: the next batches use the rounded values (jaxnorm computes in float32; the
    range anomalib computes in the states' dtype is a documented difference)."""
    module, cb = fitted()
    settle(cb, module)
    # A maximum that the reduced dtypes cannot hold: the conversion changes its value.
    stand_in.tensor(module, IMAGE + "max").fill_(3.0 + 2**-10)
    check_batches(cb, module, range(20, 22))
    module.to(to)
    assert stand_in.tensor(module, IMAGE + "max").dtype == to
    check_batches(cb, module, range(30, 33))


@pytest.mark.parametrize("grid", [False, True], ids=["any values", "values on a grid"])
@pytest.mark.parametrize(
    ("to", "fed"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float16),
        (torch.float64, torch.float32),
    ],
    ids=str,
)
def test_statistics_stored_into_a_converted_module_are_anomalibs(where, to, fed, grid):
    """A module converted before validation (``module.to(dtype)``): anomalib's update,
    ``torch.max(state, torch.max(batch))``, leaves states of the promoted dtype there, holding
    the epoch's statistics exactly. So does the callback (statistics on a grid that the
    states' dtype holds too must not keep it), and it normalizes with them."""
    batches = [outputs(s) for s in range(2)]
    for b in batches:
        for key, t in b.items():
            b[key] = (t * 4).round() / 4 if grid else t
            b[key] = b[key].to(fed)
    theirs = Model().attach().to(to)
    anomalib = stand_in._MinMaxNormalizationCallback()
    anomalib.on_validation_epoch_start(None, theirs)
    for i, b in enumerate(clone(b) for b in batches):
        anomalib.on_validation_batch_end(None, theirs, b, None, i)
    module, cb = Model().attach().to(to), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    validate(cb, module, batches)
    for path in stand_in.STATS:
        got, want = stand_in.tensor(module, path), stand_in.tensor(theirs, path)
        assert (got.dtype, float(got)) == (want.dtype, float(want)), path
    centre_thresholds(module)
    cb.on_test_start(None, module)
    check_batches(cb, module, range(10, 14))


# -- copies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_copy_of_the_callback_reads_its_module_again(where, how):
    """A copy holds no cache of the original: it reads the module it is given, whose
    statistics are the original's, written since, and whose tensors may be the same."""
    module, cb = fitted()
    settle(cb, module)
    copied = {
        "deepcopy": copy.deepcopy,
        "copy": copy.copy,
        "pickle": lambda c: pickle.loads(pickle.dumps(c)),
    }[how](cb)
    assert not copied.steady
    stand_in.tensor(module, IMAGE + "max").data.fill_(9.0)  # keys of identity miss this
    copied.on_test_start(None, module)
    check_batches(copied, module, range(20, 23))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_the_module_is_read_again(where, how):
    """A copied module's tensors restart their version counters: a key remembered from the
    original must not meet them by chance."""
    module, cb = fitted()
    settle(cb, module)
    copied = copy.deepcopy(module) if how == "deepcopy" else pickle.loads(pickle.dumps(module))
    stand_in.tensor(copied, IMAGE + "max").fill_(7.0)
    check_batches(cb, copied, range(20, 23))
    check_batches(cb, module, range(30, 32))


# -- what the hook holds ------------------------------------------------------------------


@pytest.mark.parametrize("test_start", [True, False], ids=["on_test_start", "batches only"])
def test_an_abandoned_validation_epoch_does_not_leak_into_test(where, test_start):
    """Driven by hand: a validation epoch folds a batch and is abandoned; test batches use
    what ``normalization_metrics`` holds (the per-output design reset it at the epoch start,
    so there is nothing to use: the callback says so; the shared one never resets), never
    the hook's partial statistics."""
    module, cb = fitted()
    settle(cb, module)
    cb.on_validation_epoch_start(None, module)
    cb.on_validation_batch_end(None, module, outputs(40, scale=9.0), None, 0)
    if PER_OUTPUT:
        assert stand_in.pair(module, IMAGE) == stand_in.EMPTY
        with pytest.raises(jaxnorm.StatisticsMissingError):
            if test_start:
                cb.on_test_start(None, module)
            check_batches(cb, module, [50])
        return
    if test_start:
        cb.on_test_start(None, module)
    check_batches(cb, module, range(50, 53))


def test_thresholds_set_on_the_hook_by_hand_are_replaced_by_the_modules(where):
    module, cb = fitted()
    settle(cb, module)
    cb.hook.image_threshold = 9.0  # the hook no longer holds pl_module's threshold
    check_batches(cb, module, range(20, 22))


def test_statistics_set_on_the_hook_by_hand_are_replaced_by_the_modules(where):
    module, cb = fitted()
    settle(cb, module)
    cb.hook.set_stats(jaxnorm.MinMax(min=-50.0, max=50.0))
    check_batches(cb, module, range(20, 22))


# -- reused buffers -----------------------------------------------------------------------


def test_output_buffers_written_after_each_hook_returns_change_nothing(where):
    """The caller's buffers, written as soon as a hook returns: the statistics were taken and
    the outputs computed by then."""
    batches = [outputs(s) for s in range(3)]
    module, cb = Model().attach(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    cb.on_validation_epoch_start(None, module)
    for i, b in enumerate(clone(b) for b in batches):
        cb.on_validation_batch_end(None, module, b, None, i)
        for t in b.values():
            t.fill_(1e4)
    cb.on_validation_epoch_end(None, module)
    maps = np.concatenate([b["anomaly_maps"].numpy().ravel() for b in batches])
    scores = np.concatenate([b["pred_scores"].numpy().ravel() for b in batches])
    want = (scores.min(), scores.max()) if PER_OUTPUT else (maps.min(), maps.max())
    assert stand_in.pair(module, IMAGE) == tuple(map(float, want))
    centre_thresholds(module)
    cb.on_test_start(None, module)
    for i in range(4):
        raw = outputs(60 + i)
        batch, given = clone(raw), clone(raw)
        batch = dict(given)
        cb.on_test_batch_end(None, module, batch, None, i)
        for t in given.values():
            t.fill_(-1e4)  # the inputs, written after the hook returned
        assert_normalized(batch, raw, expected(module, raw))


# -- box scores (1.1.1+: statistics of their own) ------------------------------------------


@pytest.mark.skipif(not PER_OUTPUT, reason="box statistics of their own: 1.1.1+")
@pytest.mark.parametrize("method", tensor_writes.METHODS)
def test_every_write_to_the_box_statistics_is_seen_by_the_next_batch(where, method):
    module, cb = fitted(boxes=True)
    cb.on_test_start(None, module)
    check_batches(cb, module, range(10, 12), boxes=True)
    for path, new in ((BOX + "max", 6.0), (BOX + "min", -6.0), (PIXEL_T, 0.125)):
        owner, name = tensor_writes.resolve(module, path)
        tensor_writes.write(owner, name, new, method)
        check_batches(cb, module, range(20, 22), boxes=True)


@pytest.mark.skipif(not PER_OUTPUT, reason="box statistics of their own: 1.1.1+")
def test_box_statistics_of_an_abandoned_epoch_are_not_used(where):
    """A validation epoch folds boxes and is abandoned; the checkpoint of before is loaded
    again (it holds the same box statistics as the box hook held before the epoch): the
    box hook's partial statistics must not be taken for them."""
    module, cb = fitted(boxes=True)
    saved = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()
    }
    cb.on_test_start(None, module)
    check_batches(cb, module, range(10, 12), boxes=True)
    cb.on_validation_epoch_start(None, module)
    cb.on_validation_batch_end(None, module, outputs(40, scale=9.0, boxes=True), None, 0)
    module.load_state_dict(saved)
    check_batches(cb, module, range(50, 53), boxes=True)
