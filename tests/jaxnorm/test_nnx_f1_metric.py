"""jaxnorm.nnx.F1AdaptiveThresholdMetric: the F1 threshold as an nnx.Metric."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm.nnx import F1AdaptiveThresholdMetric
from jaxnorm.testing import count_compiles
from tests import f1_reference as ref


def batches(n=4, seed=0, shape=(4, 1, 8, 8)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        masks = rng.random(shape) < 0.1
        out.append(((rng.normal(size=shape) + 2 * masks).astype(np.float32), masks))
    return out


def flat(data):
    return (
        np.concatenate([s.ravel() for s, _ in data]),
        np.concatenate([m.ravel() for _, m in data]),
    )


@nnx.jit
def jit_update(metric, maps, masks):
    metric.update(anomaly_maps=maps, masks=masks)


def eager_update(metric, maps, masks):
    metric.update(anomaly_maps=maps, masks=masks)


@pytest.mark.parametrize("update", [eager_update, jit_update], ids=["eager", "nnx.jit"])
def test_equals_reference_and_resets(update):
    data = batches()
    metric = F1AdaptiveThresholdMetric()
    for maps, masks in data:
        update(metric, jnp.asarray(maps), jnp.asarray(masks))
    want = ref.f1_threshold(*flat(data))
    assert float(metric.compute()) == want
    assert float(metric.compute_with_bound().max_f1_lost) == 0
    metric.reset()
    with pytest.raises(ValueError, match="no score to choose"):
        metric.compute()


def test_inside_multimetric_beside_minmax_with_a_mask_and_no_recompile():
    data = batches(seed=1)
    metrics = nnx.MultiMetric(
        f1=F1AdaptiveThresholdMetric("maps", "labels"),
        stats=jaxnorm.nnx.MinMaxMetric("maps"),
    )

    @nnx.jit
    def step(metrics, maps, labels, valid):
        metrics.update(maps=maps, labels=labels, mask=valid)

    valid = [np.random.default_rng(i).random(m.shape) < 0.8 for i, (m, _) in enumerate(data)]
    step(metrics, data[0][0], data[0][1], valid[0])
    with count_compiles() as log:
        for (maps, labels), v in zip(data[1:], valid[1:], strict=True):
            step(metrics, maps, labels, v)
    assert log.count == 0, log.names
    out = metrics.compute()
    keep = np.concatenate([v.ravel() for v in valid])
    scores, labels = flat(data)
    assert float(out["f1"]) == ref.f1_threshold(scores[keep], labels[keep])


def test_merge_and_state_handoff():
    data = batches(seed=2)
    a, b = F1AdaptiveThresholdMetric(), F1AdaptiveThresholdMetric()
    for maps, masks in data[:2]:
        a.update(anomaly_maps=maps, masks=masks)
    for maps, masks in data[2:]:
        b.update(anomaly_maps=maps, masks=masks)
    a.merge(b)
    assert float(a.compute()) == ref.f1_threshold(*flat(data))
    state = a.state()
    assert isinstance(state, jaxnorm.F1AdaptiveThreshold) and state.mode == "bounded"
    assert float(state.compute()) == float(a.compute())


def test_missing_keys_are_named():
    metric = F1AdaptiveThresholdMetric(label_argname="gt_mask")
    with pytest.raises(TypeError, match="expected keyword argument 'gt_mask'"):
        metric.update(anomaly_maps=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="expected keyword argument 'anomaly_maps'"):
        metric.update(gt_mask=np.zeros(3, bool))
