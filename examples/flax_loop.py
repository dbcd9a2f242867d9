"""A hand-written Flax loop with jaxnorm's hook: train, validate (thresholds too), test.

A tiny Flax NNX autoencoder learns to redraw normal 4x4 "images" (smooth gradients); an
anomalous image has a bright spot it cannot redraw. Its anomaly map is the squared
reconstruction error, its image score the map's maximum. ``MinMaxNormalizationHook`` is
called where Lightning would call anomalib's callback: validation batches, with their
labels, feed the min/max statistics and anomalib's F1 adaptive threshold
(``thresholds="f1"``); test batches come back with every score in [0, 1] and each threshold
at 0.5.

Run it: ``python examples/flax_loop.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxnorm

rng = np.random.default_rng(0)


def make_images(n: int, anomalous: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` flattened 4x4 images and their labels; a fraction ``anomalous`` has a spot."""
    ramp = np.linspace(0.0, 1.0, 4, dtype=np.float32)
    tilt = rng.uniform(-1.0, 1.0, (n, 2, 1, 1)).astype(np.float32)
    images = tilt[:, 0] * ramp[:, None] + tilt[:, 1] * ramp[None, :]
    images += rng.normal(0.0, 0.02, images.shape).astype(np.float32)
    labels = rng.random(n) < anomalous
    spots = rng.integers(0, 16, n)
    images.reshape(n, 16)[labels, spots[labels]] += 2.0
    return images.reshape(n, 16), labels


class AutoEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.encode = nnx.Linear(16, 3, rngs=rngs)
        self.decode = nnx.Linear(3, 16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


graphdef, params = nnx.split(AutoEncoder(nnx.Rngs(0)))
optimizer = optax.adam(0.05)
opt_state = optimizer.init(params)


@jax.jit
def train_step(params, opt_state, images):
    def loss(params):
        return jnp.mean((nnx.merge(graphdef, params)(images) - images) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


@jax.jit
def eval_step(params, images):
    """anomalib's output keys: per-pixel ``anomaly_maps`` and per-image ``pred_scores``."""
    error = (nnx.merge(graphdef, params)(images) - images) ** 2
    return {"anomaly_maps": error.reshape(-1, 1, 4, 4), "pred_scores": error.max(axis=1)}


val_batches = [make_images(32, anomalous=0.5) for _ in range(4)]
test_batches = [make_images(32, anomalous=0.5) for _ in range(4)]

# -- the loop: train, then validate through the hook, every epoch ---------------------
# thresholds="f1": anomalib's F1 adaptive thresholds, in raw units, from each validation
# epoch's "pred_scores" and "label" (no "mask" here, so the pixel threshold is the image one)
hook = jaxnorm.MinMaxNormalizationHook(thresholds="f1")
for epoch in range(3):
    for _ in range(100):
        params, opt_state, loss = train_step(params, opt_state, make_images(32, 0.0)[0])
    hook.on_validation_epoch_start()  # resets the statistics and the thresholds' states
    for images, labels in val_batches:
        outputs = {**eval_step(params, images), "label": labels}  # anomalib's keys
        hook.on_validation_batch_end(outputs)  # one jitted call, no sync
    hook.on_validation_epoch_end()  # sets the thresholds; raises here if a batch held NaN/inf
    lo, hi = hook.host_stats()["image"]
    print(
        f"epoch {epoch}: loss {float(loss):.4f}, statistics [{lo:.4f}, {hi:.4f}], "
        f"threshold {hook.image_threshold:.4f}"
    )

# -- test: every score lands in [0, 1], each threshold at 0.5 ---------------------------
hook.on_test_start()  # fails early if there are no statistics
agree, total, lo, hi, hits = 0, 0, 1.0, 0.0, 0
for images, labels in test_batches:
    raw = eval_step(params, images)
    out = hook.on_test_batch_end(raw)  # a normalized copy of the dict
    normalized = np.asarray(out["pred_scores"])
    agree += np.sum((normalized >= 0.5) == (np.asarray(raw["pred_scores"]) >= hook.image_threshold))
    total += len(normalized)
    hits += np.sum((normalized >= 0.5) == labels)
    lo, hi = min(lo, normalized.min()), max(hi, normalized.max())
    maps = np.asarray(out["anomaly_maps"])
    assert 0.0 <= maps.min() and maps.max() <= 1.0, (maps.min(), maps.max())

assert 0.0 <= lo and hi <= 1.0 and agree == total, (lo, hi, agree, total)
print(f"normalized test scores in [{lo:.3f}, {hi:.3f}], threshold at 0.5")
print(f"decisions at 0.5 that match the raw threshold: {agree}/{total}")
print(f"test images classified correctly at 0.5: {hits}/{total}")
