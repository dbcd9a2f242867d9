"""Batches of varying sizes compile O(log n) times per phase, and come back at their size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm._src import batching
from jaxnorm.testing import count_compiles
from tests import reference

MAX_ROWS = 64
BUDGET = 2 * (int(np.log2(MAX_ROWS)) + 2)  # per phase, as issue 11 asks


def batches(seed, to_jax):
    rng = np.random.default_rng(seed)
    out = []
    for n in rng.integers(1, MAX_ROWS + 1, size=200):
        b = {
            "pred_scores": rng.normal(1.0, 2.0, size=n).astype(np.float32),
            "anomaly_maps": rng.normal(0.0, 1.0, size=(n, 1, 4, 4)).astype(np.float32),
        }
        out.append({k: jnp.asarray(v) for k, v in b.items()} if to_jax else b)
    return out


@pytest.mark.parametrize("stats", ["shared", "separate"])
@pytest.mark.parametrize("to_jax", [False, True], ids=["numpy", "jax-cpu"])
def test_random_batch_sizes_compile_logarithmically(to_jax, stats):
    val, test = batches(0, to_jax), batches(1, to_jax)
    hook = jaxnorm.MinMaxNormalizationHook(1.0, 0.0, stats=stats)
    with count_compiles() as log:
        hook.on_validation_epoch_start()
        for b in val:
            hook.on_validation_batch_end(b)
        hook.on_validation_epoch_end()
    assert log.count <= BUDGET, log.names
    with count_compiles() as log:
        hook.on_test_start()
        outs = [hook.on_test_batch_end(b) for b in test[:100]]
        outs += [hook.on_predict_batch_end(b) for b in test[100:]]
    assert log.count <= BUDGET, log.names

    maps = reference.min_max(*[np.asarray(b["anomaly_maps"]) for b in val])
    scores = reference.min_max(*[np.asarray(b["pred_scores"]) for b in val])
    assert hook.host_stats()["pixel"] == maps
    assert hook.host_stats()["image"] == (maps if stats == "shared" else scores)
    n_maps = sum(np.asarray(b["anomaly_maps"]).size for b in val)
    assert hook.num_values["pixel"] == n_maps
    for raw, got in zip(test, outs, strict=True):
        for key, which, t in (("pred_scores", "image", 1.0), ("anomaly_maps", "pixel", 0.0)):
            assert got[key].shape == raw[key].shape and isinstance(got[key], jax.Array)
            np.testing.assert_allclose(
                np.asarray(got[key]),
                reference.normalize(np.asarray(raw[key]), t, *hook.host_stats()[which]),
                atol=1e-6,
            )


def test_padding_is_masked_out_of_the_statistics_and_counts():
    # the padding rows (zeros) lie outside the data's range: they must not be folded in
    hook = jaxnorm.MinMaxNormalizationHook(nonfinite="omit")
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"pred_scores": np.full(4, 5.0, np.float32)})  # first size
    odd = np.array([7.0, np.nan, 6.0], np.float32)  # padded to 4 rows
    hook.on_validation_batch_end({"pred_scores": odd})
    hook.on_validation_epoch_end()
    assert hook.host_stats()["image"] == (5.0, 7.0)
    assert hook.num_values["image"] == 7 and hook.num_nonfinite["image"] == 1


def test_accelerator_arrays_are_padded_by_small_jitted_ops(monkeypatch):
    # CPU stands in for an accelerator: the jitted pad and slice must give the same results
    monkeypatch.setattr(batching, "_on_host", lambda x: isinstance(x, np.ndarray))
    hook = jaxnorm.MinMaxNormalizationHook(0.5, 0.5)
    rng = np.random.default_rng(2)
    val = [rng.normal(size=(n, 2)).astype(np.float32) for n in (8, 5, 3)]
    hook.on_validation_epoch_start()
    for v in val:
        hook.on_validation_batch_end({"anomaly_maps": jnp.asarray(v)})
    hook.on_validation_epoch_end()
    lo, hi = reference.min_max(*val)
    assert hook.host_stats()["pixel"] == (lo, hi)
    for n in (8, 5, 3):
        x = jnp.asarray(rng.normal(size=(n, 2)).astype(np.float32))
        got = hook.on_test_batch_end({"anomaly_maps": x})["anomaly_maps"]
        assert got.shape == x.shape
        np.testing.assert_allclose(got, reference.normalize(x, 0.5, lo, hi), atol=1e-6)


def test_pre_padded_batches_with_valid_rows():
    """The Lightning shim pads in torch and passes the true size: rows beyond are ignored."""
    hook = jaxnorm.MinMaxNormalizationHook(0.0, 0.0, stats="separate")
    scores = np.array([1.0, 3.0, 2.0, -100.0], np.float32)  # 3 real rows, 1 of padding
    maps = np.array([[0.0], [4.0], [2.0], [100.0]], np.float32)
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end({"pred_scores": scores, "anomaly_maps": maps}, valid_rows=3)
    hook.on_validation_epoch_end()
    assert hook.host_stats() == {"image": (1.0, 3.0), "pixel": (0.0, 4.0)}
    assert hook.num_values == {"image": 3, "pixel": 3}
    got = hook.normalize_batch({"pred_scores": scores}, valid_rows=3)["pred_scores"]
    assert got.shape == (4,)  # padded as given: the caller slices
    np.testing.assert_allclose(got[:3], reference.normalize(scores[:3], 0.0, 1.0, 3.0))
    with pytest.raises(ValueError, match="valid_rows=5 does not fit"):
        hook.on_validation_batch_end({"pred_scores": scores}, valid_rows=5)


def test_bucket_sizes():
    assert [batching.bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 64, 65)] == [
        0,
        1,
        2,
        4,
        8,
        8,
        16,
        64,
        128,
    ]
