"""torch_compat/_steady.py: the steady test and validation paths of the 0.x callback. What the
first batch of a layout settled (its plan) is not done again: imports, jitted calls, exports
and compiles are counted, with negative controls; batches that differ from the plan take the
full path and get its errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import jaxnorm
import jaxnorm.testing
import torch_compat
import torch_compat._allreduce
import torch_compat._callback
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
    monkeypatch.setattr(_dlpack, "fast_from_dlpack", spy("imports", _dlpack.fast_from_dlpack))
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
