"""A small convolutional autoencoder in Flax NNX, and the anomaly maps it yields.

Trained on normal surfaces only, it learns to redraw the texture; a defect is something
it cannot redraw, so the reconstruction error is high there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnorm._src.compat import nnx_list
from jaxnorm.demo.data import crop


class ConvAutoencoder(nnx.Module):
    """Three stride-2 convolutions down to a 1/8-resolution bottleneck, and back up.

    The decoder upsamples by repetition followed by a convolution: cheaper than transposed
    convolutions on CPU, and free of their checkerboard artifacts.

    Args:
      rngs: ``nnx.Rngs`` for the initial weights.
      width: channels at half resolution (doubled at 1/4, halved at full resolution).
      latent: channels of the bottleneck; few enough that defects do not fit through.
    """

    def __init__(self, rngs: nnx.Rngs, width: int = 16, latent: int = 8):
        def conv(i, o, stride=1):
            return nnx.Conv(i, o, (3, 3), strides=stride, padding="SAME", rngs=rngs)

        w1, w2, w0 = width, 2 * width, max(width // 2, 1)
        self.encoder = nnx_list([conv(1, w1, 2), conv(w1, w2, 2), conv(w2, latent, 2)])
        self.decoder = nnx_list([conv(latent, w2), conv(w2, w1), conv(w1, w0)])
        self.head = conv(w0, 1)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstructs ``(B, H, W)`` images (H and W multiples of 8)."""
        x = images[..., None] - 0.5
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            # The bottleneck stays linear so it can carry signed texture phases.
            x = nnx.gelu(x) if i < len(self.encoder) - 1 else x
        for layer in self.decoder:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nnx.gelu(layer(x))
        return self.head(x)[..., 0] + 0.5


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def smooth(maps: jax.Array, sigma: float = 2.5) -> jax.Array:
    """Separable Gaussian blur of ``(B, H, W)`` maps, with edge padding (no dark border)."""
    k = _gaussian_kernel(sigma)
    r = k.size // 2
    x = jnp.pad(maps, ((0, 0), (r, r), (r, r)), mode="edge")
    # Two 1-D passes written as shifted sums: cheap at this kernel size and shape-generic.
    h, w = maps.shape[1:]
    x = sum(k[i] * x[:, :, i : i + w] for i in range(k.size))
    return sum(k[i] * x[:, i : i + h, :] for i in range(k.size))


def init_model(seed: int, **kwargs) -> ConvAutoencoder:
    """Builds a ``ConvAutoencoder`` with LeCun-normal kernels and zero biases drawn by numpy.

    ``nnx.eval_shape`` gives the structure without running any initializer. On a small CPU,
    compiling jax's random-number programs once per weight shape takes longer than the
    whole training run; numpy draws the same distribution instantly.

    Args:
      seed: seed of the numpy generator.
      **kwargs: passed to ``ConvAutoencoder``.
    """
    abstract = nnx.eval_shape(lambda: ConvAutoencoder(nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if any(getattr(k, "key", None) == "kernel" for k in path):
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(0.0, fan_in**-0.5, leaf.shape), leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map_with_path(draw, state))


def reconstruction_loss(model: ConvAutoencoder, frames: jax.Array) -> jax.Array:
    """Mean squared error over the inspected region of ``(B, H + 2m, W + 2m)`` frames."""
    return jnp.mean(crop(model(frames) - frames) ** 2)


def anomaly_outputs(model: ConvAutoencoder, frames: jax.Array) -> dict[str, jax.Array]:
    """anomalib-style outputs for a batch of frames.

    Args:
      model: the trained autoencoder.
      frames: ``(B, H + 2m, W + 2m)`` frames, ``m = data.MARGIN``.

    Returns:
      ``anomaly_maps`` ``(B, 1, H, W)``: the smoothed squared reconstruction error over the
      inspected region; ``pred_scores`` ``(B,)``: its maximum per image; and
      ``reconstruction_error`` ``(B,)``: the mean unsmoothed error per image (the training
      loss; a key the normalization hook passes through untouched).
    """
    error = (model(frames) - frames) ** 2
    # Smooth the whole frame, then crop: the blur sees real context at the image's edges.
    maps = crop(smooth(error))
    return {
        "anomaly_maps": maps[:, None],
        "pred_scores": jnp.max(maps, axis=(1, 2)),
        "reconstruction_error": jnp.mean(crop(error), axis=(1, 2)),
    }
