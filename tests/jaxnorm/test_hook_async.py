"""No per-batch hook waits for the model: each call returns while its inputs are computed.

On CPU, jax dispatches asynchronously as on a GPU, so a hook call that returns while a slow
jitted producer is still running provably did not read anything that depends on it (SPEC 6).
The producer's outputs are checked with ``is_ready()`` right after each call; the negative
control shows that a hook reading the non-finite count at each batch, as the hook once did,
is caught by that check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxnorm
from tests import slow_producer

N = 12  # images per batch: not a power of two, so the steady size is not a bucket


def _produce(seed, poison, steps):
    """A stand-in for a model's forward pass: ``steps`` dependent matmuls, then outputs."""
    m = jax.random.normal(jax.random.key(seed), (384, 384), jnp.float32) / 20
    m = lax.fori_loop(0, steps, lambda i, m: jnp.tanh(m @ m + 0.1), m)
    flat = m.reshape(-1)
    maps = flat[: N * 64].reshape(N, 1, 8, 8)
    maps = jnp.where(poison & (jnp.arange(N * 64).reshape(N, 1, 8, 8) < 3), jnp.nan, maps)
    return {"pred_scores": flat[-N:] + 1.0, "anomaly_maps": maps}


@pytest.fixture(scope="module")
def producer():
    """``produce(seed, poison)``: a jitted producer that runs for at least 0.3 s here."""
    produce = slow_producer.calibrated(_produce)
    return lambda seed, poison=False: produce(seed, poison)


def ready_outputs(produce, seed=100):
    return jax.block_until_ready(produce(seed))


def warm(hook, produce):
    """Compiles every per-batch call on ready inputs, so timed calls only dispatch."""
    hook.on_validation_epoch_start()
    hook.on_validation_batch_end(ready_outputs(produce))
    hook.on_validation_epoch_end()
    hook.on_test_start()
    hook.on_test_batch_end(ready_outputs(produce))


def returned_before_producer(call, outputs) -> bool:
    """Calls ``call(outputs)`` and says whether the producer was still running after it."""
    call(outputs)
    return not any(v.is_ready() for v in outputs.values())


@pytest.mark.parametrize("nonfinite", ["raise", "omit"])
@pytest.mark.parametrize("stats", ["shared", "separate"])
def test_validation_batch_returns_before_the_producer_finishes(producer, nonfinite, stats):
    hook = jaxnorm.MinMaxNormalizationHook(stats=stats, nonfinite=nonfinite)
    warm(hook, producer)
    hook.on_validation_epoch_start()
    assert returned_before_producer(hook.on_validation_batch_end, producer(1))
    assert returned_before_producer(hook.on_validation_batch_end, producer(2))
    hook.on_validation_epoch_end()
    assert hook.num_values["pixel"] == 2 * N * 64


def test_nonfinite_batch_is_decided_on_device_and_raised_at_epoch_end(producer):
    hook = jaxnorm.MinMaxNormalizationHook()
    warm(hook, producer)
    hook.on_validation_epoch_start()
    good = ready_outputs(producer, seed=3)
    hook.on_validation_batch_end(good)
    assert returned_before_producer(hook.on_validation_batch_end, producer(4, poison=True))
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="3 non-finite.*'anomaly_maps'.*batch 1"):
        hook.on_validation_epoch_end()
    maps = np.asarray(good["anomaly_maps"])
    assert hook.host_stats()["image"] == (float(maps.min()), float(maps.max()))  # not folded


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_test_and_predict_batches_return_before_the_producer_finishes(producer, stage):
    hook = jaxnorm.MinMaxNormalizationHook(0.2, 0.1)
    warm(hook, producer)
    call = hook.on_test_batch_end if stage == "test" else hook.on_predict_batch_end
    outputs = producer(5)
    assert returned_before_producer(call, outputs)
    got = call(outputs)
    lo, hi = hook.host_stats()["pixel"]
    from tests import reference

    np.testing.assert_allclose(
        np.asarray(got["anomaly_maps"]),
        reference.normalize(np.asarray(outputs["anomaly_maps"]), 0.1, lo, hi),
        atol=1e-6,
    )


class _ReadsCountEachBatch(jaxnorm.MinMaxNormalizationHook):
    """The old behaviour: the non-finite count is read on the host at every batch."""

    def on_validation_batch_end(self, outputs, **kwargs):
        out = super().on_validation_batch_end(outputs, **kwargs)
        jax.device_get(self.adapter.last_fold())  # any read of the record waits for the batch
        return out


def test_negative_control_a_per_batch_read_is_detected(producer):
    hook = _ReadsCountEachBatch()
    warm(hook, producer)
    hook.on_validation_epoch_start()
    assert not returned_before_producer(hook.on_validation_batch_end, producer(6))
