"""Min-max normalization of anomaly scores around a threshold."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import validation

ArrayLike = validation.ArrayLike

_FINITE_HINT = "it must be a finite number"
_EMPTY_HINT = (
    "statistics that are not finite come from a MinMax that saw no finite value: run "
    "validation (or load saved statistics) before normalizing"
)


def output_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype ``normalize`` returns: a floating dtype is kept, anything else is float32."""
    return dtype if jnp.issubdtype(dtype, jnp.floating) else np.dtype(jnp.float32)


def _math(targets, threshold, min_val, max_val):
    out_dtype = output_dtype(targets.dtype)
    compute = jnp.promote_types(out_dtype, jnp.float32)
    x = targets.astype(compute)
    threshold = jnp.asarray(threshold, compute)
    scale = 1 / (jnp.asarray(max_val, compute) - jnp.asarray(min_val, compute))
    d = x - threshold
    # A degenerate range gives scale = inf: d * inf is -inf/+inf (clipped to 0/1) away from
    # the threshold and NaN at it, so the threshold itself is pinned to 0.5 explicitly.
    y = jnp.where(d == 0, 0.5, d * scale + 0.5)
    return jnp.clip(y, 0, 1).astype(out_dtype)


_normalize = jax.jit(_math)


@jax.jit
def _normalize_packed(targets, params):
    """``_normalize`` with ``params = [threshold, min, max]``: one transfer, not three."""
    return _math(targets, params[0], params[1], params[2])


def pack(threshold: float, min_val: float, max_val: float) -> np.ndarray:
    """The host scalars of one call as one array (each scalar argument is its own transfer
    to an accelerator, which costs more than normalizing a batch of image scores)."""
    dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    return np.array([threshold, min_val, max_val], dtype)


@functools.lru_cache(maxsize=16)
def _device_pack(threshold: float, min_val: float, max_val: float, x64: bool) -> jax.Array:
    # Successive batches share their threshold and statistics: transfer them once.
    del x64  # part of the cache key: pack's dtype depends on it
    return jax.device_put(pack(threshold, min_val, max_val))


def normalize(
    targets: ArrayLike, threshold: ArrayLike, min_val: ArrayLike, max_val: ArrayLike
) -> jax.Array:
    r"""Maps raw anomaly scores to [0, 1] so that ``threshold`` lands at 0.5.

    .. math::

      \mathrm{normalize}(x) = \mathrm{clip}\left(\frac{x - t}{\max - \min} + 0.5,\; 0,\; 1\right)

    as in anomalib's ``normalize``, with one fix: when ``max_val == min_val`` the result is
    0 below the threshold, 0.5 at it and 1 above it, never NaN.

    The computation is one fused, jit-compiled pass in at least float32 (the reciprocal of
    the range is taken once, so results can differ from a true division by an ulp; as
    everywhere in XLA, subnormal inputs are flushed to zero). The
    scalars are traced arguments: new threshold or min/max values never recompile.

    Args:
      targets: scores of any shape: a jax array, a numpy array or a number. NaN scores stay
        NaN (they are the caller's data); infinite scores clip to 0 or 1.
      threshold: the raw score that maps to 0.5.
      min_val: the smallest raw score seen during validation.
      max_val: the largest raw score seen during validation.

    Scalars given as jax arrays are fetched to the host (together, one sync) to be checked;
    Python floats skip that round trip.

    Returns:
      A jax array of the shape of ``targets``, with its dtype when floating (float16,
      bfloat16, float32, and float64 under x64), else float32.

    Raises:
      ValueError: ``targets`` is not numeric, a scalar is not finite, or
        ``max_val < min_val`` (empty statistics are ``+inf``/``-inf``: run validation or load
        statistics first). Scalars given as tracers, inside the caller's ``jit``, are not
        checked.
    """
    targets = validation.as_array("targets", targets)
    threshold, min_val, max_val = validation.host_scalars(
        ("threshold", threshold, _FINITE_HINT),
        ("min_val", min_val, _EMPTY_HINT),
        ("max_val", max_val, _EMPTY_HINT),
    )
    if isinstance(min_val, float) and isinstance(max_val, float) and max_val < min_val:
        raise ValueError(
            f"max_val ({max_val}) is smaller than min_val ({min_val}); pass statistics from a "
            "MinMax that has seen data."
        )
    if isinstance(threshold, float) and isinstance(min_val, float) and isinstance(max_val, float):
        params = _device_pack(threshold, min_val, max_val, bool(jax.config.jax_enable_x64))
        return _normalize_packed(targets, params)
    return _normalize(targets, threshold, min_val, max_val)
