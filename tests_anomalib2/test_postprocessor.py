"""torch_compat.anomalib2.PostProcessor against anomalib 2.7.0's, hook by hook.

Each test drives both classes with the same ``ImageBatch`` objects, as Lightning would, and
compares them exactly; statistics are also checked against numpy.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import types
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.post_processing import PostProcessor as AnomalibPostProcessor
from common import BUFFERS, FIELDS

import jaxnorm
from jaxnorm.testing import count_compiles
from torch_compat import _change, _dlpack, _postprocessor
from torch_compat.anomalib2 import PostProcessor


def val_batch(seed, n=4, size=8, *, labels=True, score=True, amap=True, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        image=torch.rand(n, 3, size, size, generator=g),
        gt_label=torch.tensor([i % 2 for i in range(n)]) if labels else None,
        gt_mask=(torch.rand(n, size, size, generator=g) > 0.8) if labels else None,
        pred_score=torch.randn(n, generator=g) * scale if score else None,
        anomaly_map=torch.randn(n, size, size, generator=g) * scale if amap else None,
    )


def batch(fields):
    """A fresh ImageBatch each time: post-processing rewrites it in place."""
    return ImageBatch(**{k: (v.clone() if v is not None else None) for k, v in fields.items()})


def validate(pp, batches):
    for b in batches:
        pp.on_validation_batch_end(None, None, batch(b))
    pp.on_validation_epoch_end(None, None)


def assert_same(a, b, what=""):
    assert type(a) is type(b), (what, type(a), type(b))
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype)
    assert torch.equal(a, b) or (
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
    ), (what, a, b)


def assert_same_buffers(ours, theirs):
    for name in BUFFERS:
        assert_same(getattr(ours, name), getattr(theirs, name), name)


def test_validation_statistics_equal_anomalibs_and_numpys_per_epoch():
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    for epoch in range(2):  # each epoch starts over, as anomalib's reset metrics do
        batches = [val_batch(10 * epoch + i, scale=1 + epoch) for i in range(3)]
        validate(ours, batches)
        validate(theirs, batches)
        assert_same_buffers(ours, theirs)
        scores = torch.cat([b["pred_score"] for b in batches]).numpy()
        maps = torch.cat([b["anomaly_map"] for b in batches]).numpy()
        assert ours.image_min.item() == scores.min() and ours.image_max.item() == scores.max()
        assert ours.pixel_min.item() == maps.min() and ours.pixel_max.item() == maps.max()
    # the statistics came from jaxnorm: anomalib's MinMax metrics were never updated
    assert not ours._image_min_max_metric.update_called
    assert not ours._pixel_min_max_metric.update_called


def test_a_field_no_batch_had_keeps_its_buffers():
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    batches = [val_batch(i, score=False) for i in range(2)]
    validate(ours, batches)
    validate(theirs, batches)
    assert math.isnan(ours.image_min) and not math.isnan(ours.pixel_min)
    assert_same_buffers(ours, theirs)


def test_nonfinite_validation_scores_raise_where_anomalib_stores_nan():
    batches = [val_batch(i) for i in range(3)]
    batches[1]["pred_score"][[0, 2]] = torch.tensor([math.nan, math.inf])
    theirs = AnomalibPostProcessor()
    validate(theirs, batches)
    assert math.isnan(theirs.image_min)  # anomalib: NaN statistics, scores pass unnormalized
    ours = PostProcessor()
    with pytest.raises(jaxnorm.NonFiniteScoresError, match=r"2 non-finite .*'batch.pred_score'"):
        validate(ours, batches)
    # the clean batches' statistics are stored before raising
    clean = torch.cat([batches[0]["pred_score"], batches[2]["pred_score"]]).numpy()
    assert (ours.image_min.item(), ours.image_max.item()) == (clean.min(), clean.max())
    maps = torch.cat([batches[0]["anomaly_map"], batches[2]["anomaly_map"]]).numpy()
    assert ours.pixel_min.item() == maps.min()


def test_nonfinite_omit_skips_them():
    batches = [val_batch(i) for i in range(3)]
    batches[1]["anomaly_map"][1, 2, :3] = math.nan
    ours = PostProcessor(nonfinite="omit")
    validate(ours, batches)
    maps = torch.cat([b["anomaly_map"] for b in batches]).numpy()
    finite = maps[np.isfinite(maps)]
    assert (ours.pixel_min.item(), ours.pixel_max.item()) == (finite.min(), finite.max())
    with pytest.raises(ValueError, match="nonfinite='sometimes'.*'raise'.*'omit'"):
        PostProcessor(nonfinite="sometimes")


NAN = math.nan
STATS = {"image_min": -2.0, "image_max": 5.0, "pixel_min": -3.0, "pixel_max": 4.0}
# (name, buffer values, constructor arguments): the states test and predict can meet.
STATES = [
    ("never validated", {}, {}),
    ("validated", {**STATS, "_image_threshold": 0.7, "_pixel_threshold": -0.4}, {}),
    ("thresholds NaN: the midpoint", {**STATS, "pixel_max": 4.5}, {}),
    ("image threshold from the pixel one", {**STATS, "_pixel_threshold": 1.1}, {}),
    (
        "no threshold matching",
        {**STATS, "_pixel_threshold": 1.1},
        {"enable_threshold_matching": False},
    ),
    (
        "zero range, no pixel statistics",
        {"image_min": 0.5, "image_max": 0.5, "pixel_max": 1.0, "_image_threshold": 0.5},
        {"image_sensitivity": 0.3},
    ),
    ("sensitivities", STATS, {"image_sensitivity": 0.8, "pixel_sensitivity": 0.1}),
    ("thresholding off", STATS, {"enable_thresholding": False}),
]


def set_buffers(pp, values):
    for name, value in values.items():
        getattr(pp, name).fill_(value)


@pytest.mark.parametrize("name, values, kwargs", STATES, ids=[s[0] for s in STATES])
def test_test_and_predict_outputs_equal_anomalibs(name, values, kwargs):
    ours, theirs = PostProcessor(**kwargs), AnomalibPostProcessor(**kwargs)
    set_buffers(ours, values)
    set_buffers(theirs, values)
    for seed in range(3):
        fields = val_batch(100 + seed, labels=False)
        fields["anomaly_map"][0, 0, :3] = torch.tensor(
            [values.get("_pixel_threshold", 0.0), 0.5, 9]
        )
        a, b = batch(fields), batch(fields)
        ours.on_test_batch_end(None, None, a)
        theirs.on_test_batch_end(None, None, b)
        for field in FIELDS:
            assert_same(getattr(a, field), getattr(b, field), (name, field))
        a, b = batch(fields), batch(fields)
        ours.on_predict_batch_end(None, None, a)
        theirs.on_predict_batch_end(None, None, b)
        for field in FIELDS:
            assert_same(getattr(a, field), getattr(b, field), (name, field))
        inference = InferenceBatch(
            pred_score=fields["pred_score"], anomaly_map=fields["anomaly_map"]
        )
        for got, want in zip(ours(inference), theirs(inference), strict=True):
            assert_same(got, want, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_keeps_anomalibs_dtypes(dtype):
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    set_buffers(ours, STATES[1][1])
    set_buffers(theirs, STATES[1][1])
    g = torch.Generator().manual_seed(3)
    inference = InferenceBatch(anomaly_map=(torch.randn(4, 16, 16, generator=g) * 3).to(dtype))
    got, want = ours(inference), theirs(inference)
    for field in FIELDS:
        assert_same(getattr(got, field), getattr(want, field), (dtype, field))


class Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = _postprocessor.JaxState.process

        def process(state, *args, **kwargs):
            self.calls += 1
            return real(state, *args, **kwargs)

        monkeypatch.setattr(_postprocessor.JaxState, "process", process)


def validated_pair():
    ours, theirs = PostProcessor(), AnomalibPostProcessor()
    batches = [val_batch(i) for i in range(2)]
    validate(ours, batches)
    validate(theirs, batches)
    return ours, theirs


def test_torch_export_takes_anomalibs_torch_formula(monkeypatch):
    ours, theirs = validated_pair()
    spy = Spy(monkeypatch)
    x = InferenceBatch(pred_score=torch.randn(4), anomaly_map=torch.randn(4, 8, 8))
    program = torch.export.export(ours, (x,))
    assert spy.calls == 0
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.div.Tensor" in targets and "aten.clamp.default" in targets, targets
    for got, want in zip(program.module()(x), theirs(x), strict=True):
        assert_same(got, want)
    ours(x)  # eagerly: jaxnorm
    assert spy.calls == 1


def test_tracing_and_onnx_export_take_anomalibs_torch_formula(monkeypatch):
    ours, theirs = validated_pair()
    spy = Spy(monkeypatch)

    class Wrapped(torch.nn.Module):
        def __init__(self, pp):
            super().__init__()
            self.pp = pp

        def forward(self, score, amap):
            out = self.pp(InferenceBatch(pred_score=score, anomaly_map=amap))
            return out.pred_score, out.anomaly_map, out.pred_label, out.pred_mask

    score, amap = torch.randn(4), torch.randn(4, 8, 8)
    with pytest.warns(FutureWarning):  # torch.jit.trace is deprecated in torch 2.14
        traced = torch.jit.trace(Wrapped(ours), (score, amap), check_trace=False)
    assert spy.calls == 0
    for got, want in zip(traced(score, amap), Wrapped(theirs)(score, amap), strict=True):
        assert_same(got, want)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    ours(InferenceBatch(pred_score=score, anomaly_map=amap))
    assert spy.calls == 0


def test_no_recompile_and_no_torch_host_read_per_batch_on_an_accelerator(monkeypatch):
    """On an accelerator (stood in for: _change.on_host says no) a read would wait for the
    device: the buffers travel with each batch and nothing is read. (On the CPU the
    buffers are read and keyed by value: a read there waits for nothing.)"""
    monkeypatch.setattr(_change, "on_host", lambda t: False)
    ours, theirs = validated_pair()
    fields = [val_batch(50 + i, labels=False) for i in range(4)]
    ours.on_test_batch_end(None, None, batch(fields[0]))  # compiles, checks the buffers
    # Any host read of a tensor now fails; anomalib's own labels read their threshold.
    for name in ("item", "tolist", "numpy", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, _no_host_read)
    with pytest.raises(AssertionError, match="host read"):
        theirs.on_test_batch_end(None, None, batch(fields[0]))
    with count_compiles() as log:
        for f in fields[1:]:
            ours.on_test_batch_end(None, None, batch(f))
        folder = PostProcessor(enable_thresholding=False)
        for f in fields:
            folder.on_validation_batch_end(None, None, batch(f))
    monkeypatch.undo()
    with count_compiles() as more:
        ours.image_max.fill_(9.0)  # new statistics: checked once, new parameters
        ours.on_test_batch_end(None, None, batch(fields[1]))
    assert more.count == 0, more.names  # ... and no new program
    assert log.count <= 1, log.names  # the validation fold, compiled once for its shapes
    folder.on_validation_epoch_end(None, None)
    maps = torch.cat([f["anomaly_map"] for f in fields]).numpy()
    assert folder.pixel_max.item() == maps.max()


def _no_host_read(*args, **kwargs):
    raise AssertionError("host read of a tensor in a per-batch hook")


def test_loaded_buffers_are_used_at_the_next_batch():
    ours, theirs = validated_pair()
    fields = val_batch(7, labels=False)
    ours.on_test_batch_end(None, None, batch(fields))
    other = AnomalibPostProcessor()
    set_buffers(other, STATES[1][1])
    ours.load_state_dict(other.state_dict(), strict=True)
    a, b = batch(fields), batch(fields)
    ours.on_test_batch_end(None, None, a)
    other.on_test_batch_end(None, None, b)
    for field in FIELDS:
        assert_same(getattr(a, field), getattr(b, field), field)


def test_pickles_as_anomalibs_class_and_copies_as_ours():
    ours, _ = validated_pair()
    buf = io.BytesIO()
    torch.save({"pp": ours}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)["pp"]
    assert type(loaded) is AnomalibPostProcessor
    assert_same_buffers(loaded, ours)
    assert loaded.checkpoint_config() == ours.checkpoint_config()
    assert type(pickle.loads(pickle.dumps(ours))) is AnomalibPostProcessor
    for copied in (copy.deepcopy(ours), copy.copy(ours)):
        assert type(copied) is PostProcessor
        assert_same_buffers(copied, ours)
    deep = copy.deepcopy(ours)
    deep.image_max.fill_(100.0)
    assert ours.image_max.item() != 100.0
    spawned = pickle.loads(ForkingPickler.dumps(PostProcessor(nonfinite="omit")))
    assert type(spawned) is PostProcessor and spawned.nonfinite == "omit"
    validate(spawned, [val_batch(1)])
    assert not math.isnan(spawned.image_min)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"image_max": math.inf}, r"'image_max' is inf; normalization statistics must be finite"),
        ({"pixel_min": 2.0, "pixel_max": 1.0}, r"'pixel_max' \(1.0\) is smaller than 'pixel_min'"),
        ({"image_min": math.inf, "image_max": -math.inf}, "no scores give these statistics"),
        ({"_pixel_threshold": -math.inf}, "_pixel_threshold"),
    ],
)
def test_unusable_buffers_are_named_before_any_batch_is_normalized(values, match):
    ours = PostProcessor()
    set_buffers(ours, {**STATS, **values})
    fields = val_batch(3, labels=False)
    before = batch(fields)
    with pytest.raises(ValueError, match="post_processor: .*" + match):
        ours.on_test_batch_end(None, None, before)
    assert torch.equal(before.pred_score, fields["pred_score"])  # left as it was
    # NaN is anomalib's "not set", not an error
    set_buffers(ours, {**STATS, "image_max": NAN, "_pixel_threshold": NAN})
    ours.on_test_batch_end(None, None, batch(fields))


def test_validation_scores_written_in_place_after_the_hook_are_folded_as_handed_over():
    """A model that reuses its output buffers overwrites them right after the hook returns:
    anomalib's metrics update synchronously, and our fold, which reads the tensors
    zero-copy and asynchronously, must also see what was handed over."""
    g = torch.Generator().manual_seed(0)
    sources = [torch.rand(16, 192, 192, generator=g) * (i + 1) for i in range(8)]
    maps, scores = torch.empty_like(sources[0]), torch.empty(16)
    images = torch.zeros(16, 3, 192, 192)
    pp = PostProcessor(enable_thresholding=False)
    for source in sources:
        maps.copy_(source)
        scores.copy_(source.flatten(1).amax(1))
        pp.on_validation_batch_end(
            None, None, ImageBatch(image=images, pred_score=scores, anomaly_map=maps)
        )
        maps.fill_(1e6)  # the caller's next write, before jax may have read them
        scores.fill_(1e6)
    pp.on_validation_epoch_end(None, None)
    everything = np.stack([s.numpy() for s in sources])
    assert pp.pixel_max.item() == everything.max() and pp.pixel_min.item() == everything.min()
    assert pp.image_max.item() == everything.reshape(8, 16, -1).max(-1).max()


# -- the batch exchange: one import per key with one stream ordering ------------------------


def _exchange_counts(monkeypatch, pp):
    """Counts full-path validation folds, batch imports and batch exports around ``pp``."""
    counts = {"full": 0, "imports": 0, "exports": 0}

    def spy(name, real):
        def call(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        return call

    hook = pp.__dict__["_jaxnorm"].hook
    monkeypatch.setattr(hook.adapter, "fold_outputs", spy("full", hook.adapter.fold_outputs))
    monkeypatch.setattr(_dlpack, "import_batch", spy("imports", _dlpack.import_batch))
    monkeypatch.setattr(_dlpack, "export_batch", spy("exports", _dlpack.export_batch))
    return counts


def test_steady_validation_batches_import_once_and_fold_once(monkeypatch):
    """anomalib's ``anomaly_map`` is a torchvision ``Mask``: it crosses as a plain view."""
    pp = PostProcessor(enable_thresholding=False)
    counts = _exchange_counts(monkeypatch, pp)
    batches = [batch(val_batch(900 + i, n=6)) for i in range(5)]
    assert type(batches[0].anomaly_map) is not torch.Tensor  # anomalib's Mask
    with count_compiles() as log:
        pp.on_validation_batch_end(None, None, batches[0])  # the full path leaves a plan
        pp.on_validation_batch_end(None, None, batches[1])  # compiles for the state it made
        settled = log.count
        for b in batches[2:]:
            pp.on_validation_batch_end(None, None, b)
    assert counts == {"full": 1, "imports": 4, "exports": 0}, counts
    assert log.count == settled, log.names
    pp.on_validation_epoch_end(None, None)
    maps = np.stack([b.anomaly_map.numpy() for b in batches])
    scores = np.stack([b.pred_score.numpy() for b in batches])
    assert (pp.pixel_min.item(), pp.pixel_max.item()) == (maps.min(), maps.max())
    assert (pp.image_min.item(), pp.image_max.item()) == (scores.min(), scores.max())


@pytest.mark.parametrize(
    "change", ["size", "float64", "non_contiguous", "map_gone", "grad", "offset_view"]
)
def test_a_validation_batch_that_differs_from_the_plan_is_folded_right(monkeypatch, change):
    ours = PostProcessor(enable_thresholding=False)
    theirs = AnomalibPostProcessor(enable_thresholding=False)
    counts = _exchange_counts(monkeypatch, ours)
    first = [val_batch(910 + i, n=6) for i in range(2)]
    other = val_batch(920, n=6, scale=7.0)
    if change == "size":
        other = val_batch(920, n=3, scale=7.0)
    elif change == "float64":
        other["anomaly_map"] = other["anomaly_map"].double()
    elif change == "non_contiguous":
        other["anomaly_map"] = other["anomaly_map"].transpose(1, 2)
    elif change == "map_gone":
        other["anomaly_map"] = None
    elif change == "grad":
        other["pred_score"].requires_grad_(True)
    elif change == "offset_view":  # the same layout, at a storage offset: copied first
        other["anomaly_map"] = (torch.randn(6 * 64 + 1) * 7.0)[1:].view(6, 8, 8)
        assert _dlpack.misaligned(other["anomaly_map"])
    for pp in (ours, theirs):
        for fields in first:
            pp.on_validation_batch_end(None, None, batch(fields))
        # ImageBatch makes every score float32 and batch() copies: these come as they are
        raw = change in ("float64", "offset_view")
        last = types.SimpleNamespace(**other) if raw else batch(other)
        pp.on_validation_batch_end(None, None, last)
        pp.on_validation_epoch_end(None, None)
    assert_same_buffers(ours, theirs)
    same_layout = change in ("grad", "offset_view")
    assert counts["full"] == (1 if same_layout else 2), counts
    assert counts["imports"] == (2 if same_layout else 1), counts


def test_test_batches_cross_with_one_import_and_one_export_call(monkeypatch):
    ours, theirs = validated_pair()
    counts = _exchange_counts(monkeypatch, ours)
    fields = [val_batch(930 + i, labels=False) for i in range(3)]
    for f in fields:
        a, b = batch(f), batch(f)
        ours.on_test_batch_end(None, None, a)
        theirs.on_test_batch_end(None, None, b)
        for field in FIELDS:
            assert_same(getattr(a, field), getattr(b, field), field)
    assert counts == {"full": 0, "imports": 3, "exports": 3}, counts
    # float64 scores take to_jax's narrowing copy, one tensor at a time, as before
    f = {k: (v.double() if k == "pred_score" else v) for k, v in fields[0].items()}
    got, want = (
        ours(InferenceBatch(**{k: f[k] for k in ("pred_score", "anomaly_map")})),
        theirs(InferenceBatch(**{k: f[k] for k in ("pred_score", "anomaly_map")})),
    )
    assert counts["imports"] == 3, counts
    assert got.pred_score.dtype == want.pred_score.dtype == torch.float64
    torch.testing.assert_close(got.pred_score, want.pred_score, rtol=1e-6, atol=1e-6)


def _edge_inputs():
    g = torch.Generator().manual_seed(11)
    maps = torch.randn(3, 8, 8, generator=g) * 3
    scores = torch.randn(3, generator=g) * 3
    return {
        "0-d score": dict(pred_score=torch.tensor(1.0)),
        "scores only": dict(pred_score=scores),
        "maps only": dict(anomaly_map=maps),
        "(N, 1) scores, (N, 1, H, W) maps": dict(
            pred_score=scores[:, None], anomaly_map=maps[:, None]
        ),
        "one (H, W) map": dict(anomaly_map=maps[0]),
        "empty batch": dict(pred_score=torch.zeros(0), anomaly_map=torch.zeros(0, 8, 8)),
        "transposed maps": dict(pred_score=scores, anomaly_map=maps.transpose(1, 2)),
        "expanded maps": dict(pred_score=scores, anomaly_map=maps[:1].expand(3, 8, 8)),
        "offset view": dict(
            pred_score=scores, anomaly_map=torch.randn(4 * 64 + 1)[1:].view(4, 8, 8)
        ),
        "requires grad": dict(
            pred_score=scores.clone().requires_grad_(), anomaly_map=maps.clone().requires_grad_()
        ),
        "NaN and inf scores": dict(
            pred_score=torch.tensor([math.nan, math.inf, -math.inf]), anomaly_map=maps
        ),
        "int scores": dict(pred_score=torch.tensor([0, 1, 5])),
        "bfloat16": dict(pred_score=scores.bfloat16(), anomaly_map=maps.bfloat16()),
        "float16": dict(pred_score=scores.half(), anomaly_map=maps.half()),
    }


@pytest.mark.parametrize("name", list(_edge_inputs()))
def test_forward_on_edge_inputs_equals_anomalibs(name):
    """Whatever crosses to jax (the batch exchange, or to_jax one tensor at a time), forward
    gives anomalib's outputs, bit for bit."""
    ours, theirs = validated_pair()
    fields = _edge_inputs()[name]
    got, want = ours(InferenceBatch(**fields)), theirs(InferenceBatch(**fields))
    for field in FIELDS:
        assert_same(getattr(got, field), getattr(want, field), (name, field))
    with torch.inference_mode():
        got, want = ours(InferenceBatch(**fields)), theirs(InferenceBatch(**fields))
    for field in FIELDS:
        assert_same(getattr(got, field), getattr(want, field), (name, "inference mode", field))


# -- caches: every write to a buffer or a sensitivity is seen (torch_compat._change) --------


@pytest.fixture(params=["cpu", "accelerator"])
def where(request, monkeypatch):
    """The CPU rule (buffers read and keyed by value), or an accelerator's, stood in for by
    ``_change.on_host`` (their values travel with each batch; only the checks are keyed)."""
    if request.param == "accelerator":
        monkeypatch.setattr(_change, "on_host", lambda t: False)
    return request.param


def assert_same_outputs(ours, theirs, seed, what):
    fields = val_batch(seed, labels=False)
    a, b = batch(fields), batch(fields)
    ours.on_test_batch_end(None, None, a)
    theirs.on_test_batch_end(None, None, b)
    for field in FIELDS:
        assert_same(getattr(a, field), getattr(b, field), (what, "test", field))
    inference = InferenceBatch(pred_score=fields["pred_score"], anomaly_map=fields["anomaly_map"])
    for field, got, want in zip(FIELDS, ours(inference), theirs(inference), strict=False):
        assert_same(got, want, (what, "forward", field))


def steady_pair(epochs=1, **kwargs):
    """Twins validated ``epochs`` times, and two test batches each: every cache is warm."""
    ours, theirs = PostProcessor(**kwargs), AnomalibPostProcessor(**kwargs)
    for epoch in range(epochs):
        batches = [val_batch(10 * epoch + i) for i in range(2)]
        validate(ours, batches)
        validate(theirs, batches)
    for seed in (60, 61):
        assert_same_outputs(ours, theirs, seed, "warm")
    return ours, theirs


WRITES = {
    "fill_": lambda pp: pp.image_min.fill_(-2.0),
    "data.fill_": lambda pp: pp.image_min.data.fill_(-2.0),
    "numpy alias": lambda pp: pp.image_max.numpy().__setitem__(..., 10.0),
    "dlpack alias": lambda pp: torch.from_dlpack(pp.pixel_max).fill_(9.0),
    "data =": lambda pp: setattr(pp._image_threshold, "data", torch.tensor(3.0)),
    "buffer replaced": lambda pp: setattr(pp, "_pixel_threshold", torch.tensor(0.4)),
    "load_state_dict": lambda pp: pp.load_state_dict(
        {**pp.state_dict(), "image_max": torch.tensor(11.0)}
    ),
    "load_state_dict(assign=True)": lambda pp: pp.load_state_dict(
        {**pp.state_dict(), "pixel_min": torch.tensor(-8.0)}, assign=True
    ),
    "inference mode": lambda pp: _in_inference_mode(lambda: pp.image_max.fill_(12.0)),
    "threshold matching off": lambda pp: (
        pp._image_threshold.fill_(math.nan),
        setattr(pp, "enable_threshold_matching", False),
    ),
}


def _in_inference_mode(fn):
    with torch.inference_mode():
        fn()


@pytest.mark.parametrize("write", list(WRITES))
def test_every_write_to_a_buffer_is_seen_by_the_next_batch(where, write):
    """Writes that leave torch's version counter as it was (.data, numpy and DLPack
    aliases, .data =) were missed: later batches were normalized with the old value."""
    ours, theirs = steady_pair()
    for pp in (ours, theirs):
        WRITES[write](pp)
    assert_same_buffers(ours, theirs)
    for seed in (70, 71):
        assert_same_outputs(ours, theirs, seed, write)


@pytest.mark.parametrize("kind", ["tensor", "numpy 0-d", "float"])
def test_a_sensitivity_written_in_place_is_seen(where, kind):
    """A sensitivity written in place (a tensor's fill_, a numpy array's [...] =) kept the
    old cut: hundreds of mask pixels differed."""
    ours, theirs = steady_pair()
    make = {"tensor": torch.tensor, "numpy 0-d": np.array, "float": float}[kind]
    for pp in (ours, theirs):
        pp.pixel_sensitivity = make(0.4)
    assert_same_outputs(ours, theirs, 80, kind)
    for value, seed in ((0.05, 81), (0.7, 82)):
        for pp in (ours, theirs):
            if kind == "float":
                pp.pixel_sensitivity = value
            else:
                pp.pixel_sensitivity[...] = value
        assert_same_outputs(ours, theirs, seed, (kind, value))


def test_a_deep_copy_that_validates_again_uses_its_own_statistics(where):
    """The copy's version counters restart (at 1): after two more validations they met the
    remembered ones (3), and the copy normalized with the original's statistics."""
    ours, theirs = steady_pair(epochs=3)
    ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
    for epoch in range(2):
        batches = [val_batch(90 + 10 * epoch + i, scale=9.0) for i in range(2)]
        validate(ours_copy, batches)
        validate(theirs_copy, batches)
    assert_same_buffers(ours_copy, theirs_copy)
    for seed in (91, 92):
        assert_same_outputs(ours_copy, theirs_copy, seed, "copy")
        assert_same_outputs(ours, theirs, seed, "original")


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double"])
@pytest.mark.parametrize("scores", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_buffers_compute_as_anomalib(where, convert, scores):
    """After module.half() / .to(torch.bfloat16) (Lightning's "16-true"/"bf16-true")
    anomalib computes the range and the midpoint in the buffers' dtype."""
    ours, theirs = steady_pair()
    # A range and a midpoint that half precision cannot hold exactly.
    values = {"image_min": -1.1, "image_max": 5.3, "pixel_min": -0.7, "pixel_max": 3.3}
    for pp in (ours, theirs):
        set_buffers(pp, {**values, "_image_threshold": math.nan, "_pixel_threshold": 0.3})
        if convert == "double":
            pp.double()
        else:
            pp.to(torch.float16 if convert == "half" else torch.bfloat16)
    assert ours.image_min.dtype == theirs.image_min.dtype != torch.float32
    for seed in (95, 96):
        fields = val_batch(seed, labels=False)
        fields["pred_score"] = fields["pred_score"].to(scores)
        fields["anomaly_map"] = fields["anomaly_map"].to(scores)
        inference = InferenceBatch(
            pred_score=fields["pred_score"], anomaly_map=fields["anomaly_map"]
        )
        for field, got, want in zip(FIELDS, ours(inference), theirs(inference), strict=False):
            if convert == "double" and got is not None and got.dtype.is_floating_point:
                # float64 statistics without x64: within float32 rounding (differences.md)
                torch.testing.assert_close(got, want, rtol=0, atol=2e-7, check_dtype=True)
            elif convert != "double":
                assert_same(got, want, (convert, scores, field))
