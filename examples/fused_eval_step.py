"""``jaxnorm.update_stats`` and ``jaxnorm.normalize_outputs`` inside your own jitted steps.

The hook costs one jitted call per batch. To pay none, fold the statistics in the eval step
you already jit: ``update_stats`` and ``normalize_outputs`` are pure functions of pytrees.

The model is the simplest anomaly detector there is: the per-pixel mean and standard
deviation of normal images; a pixel's anomaly score is its squared z-score, an image's the
maximum of its map. A pixel three standard deviations off (a raw score of 9) is anomalous.

Run it: ``python examples/fused_eval_step.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm

rng = np.random.default_rng(0)


def make_images(n: int, anomalous: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 8x8 images ``(n, 1, 8, 8)`` and their labels; anomalous ones have a spot."""
    images = rng.normal(0.5, 0.1, (n, 1, 8, 8)).astype(np.float32)
    labels = rng.random(n) < anomalous
    rows, cols = rng.integers(0, 8, (2, n))
    images[labels, 0, rows[labels], cols[labels]] += 1.0
    return images, labels


normal = make_images(256, anomalous=0.0)[0]
params = {"mean": jnp.asarray(normal.mean(axis=0)), "std": jnp.asarray(normal.std(axis=0))}
IMAGE_THRESHOLD = PIXEL_THRESHOLD = 9.0  # raw units: three standard deviations


def model_apply(params, images):
    maps = ((images - params["mean"]) / params["std"]) ** 2
    return {"anomaly_maps": maps, "pred_scores": maps.max(axis=(1, 2, 3))}


@jax.jit
def eval_step(params, stats, images):
    outputs = model_apply(params, images)
    return outputs, jaxnorm.update_stats(stats, outputs)  # mode="shared" | "separate"


@jax.jit
def test_step(params, stats, images, image_threshold, pixel_threshold):
    outputs = model_apply(params, images)
    return jaxnorm.normalize_outputs(outputs, stats, image_threshold, pixel_threshold)


# Validation: the statistics are folded inside the step; nothing is read on the host.
stats = jaxnorm.NormalizationStats.empty()
for _ in range(4):
    images, _ = make_images(32, anomalous=0.5)
    outputs, stats = eval_step(params, stats, images)
print(f"statistics: min {float(stats.image.min):.4f}, max {float(stats.image.max):.4f}")

# Test: normalized inside the jitted step; the thresholds are traced, so new ones never
# recompile.
hook = jaxnorm.MinMaxNormalizationHook(IMAGE_THRESHOLD, PIXEL_THRESHOLD)
hook.set_stats(stats)  # or hand the statistics to the hook
hook.on_test_start()
agree = hits = total = 0
for _ in range(4):
    images, labels = make_images(32, anomalous=0.5)
    fused = test_step(params, stats, images, IMAGE_THRESHOLD, PIXEL_THRESHOLD)
    by_hook = hook.on_test_batch_end(model_apply(params, images))
    for key in ("anomaly_maps", "pred_scores"):
        np.testing.assert_allclose(fused[key], by_hook[key], atol=1e-6)
        assert 0.0 <= fused[key].min() and fused[key].max() <= 1.0, key
    raw = np.asarray(model_apply(params, images)["pred_scores"])
    scores = np.asarray(fused["pred_scores"])
    agree += np.sum((scores >= 0.5) == (raw >= IMAGE_THRESHOLD))
    hits += np.sum((scores >= 0.5) == labels)
    total += len(scores)

assert agree == total, (agree, total)
print("fused and hook outputs agree; every score in [0, 1], threshold at 0.5")
print(f"decisions at 0.5 that match the raw threshold: {agree}/{total}")
print(f"test images classified correctly at 0.5: {hits}/{total}")
