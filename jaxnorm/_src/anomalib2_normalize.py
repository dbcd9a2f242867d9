"""anomalib 2.x's normalization (``PostProcessor._normalize``) and labels, as jitted functions.

anomalib >= 2 keeps its statistics in NaN-initialised buffers and normalizes with rules of its
own, which differ from the 0.x callback's ``jaxnorm.normalize``:

- a NaN threshold falls back to the midpoint ``(min + max) / 2``;
- a zero range gives 0, 0.5 or 1 by comparison with the threshold;
- NaN statistics (``min`` or ``max``: never validated) pass the scores through unchanged;
- the result is clamped to [0, 1].

The math is anomalib's, operation for operation and in the same dtypes (torch computes
``(x - t) / range + 0.5`` in the scores' dtype and the degenerate branch in float32), so that
float32, float16 and bfloat16 results are bit-identical to anomalib's (torch rounds each
half-precision operation to the half dtype, and so does this code, float16 subnormals
included).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import validation

ArrayLike = validation.ArrayLike

# The rows of ``params`` in ``postprocess``: which statistics each key uses.
IMAGE_ROW, PIXEL_ROW = 0, 1
ROWS: Mapping[str, int] = {"pred_score": IMAGE_ROW, "anomaly_map": PIXEL_ROW}


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if jnp.issubdtype(dtype, jnp.floating) else np.dtype(jnp.float32)


def result_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype anomalib 2's ``_normalize`` returns for scores of ``dtype``: at least float32.

    Not ``normalize.output_dtype`` (anomalib 0.x's callback keeps a floating dtype): torch
    computes anomalib 2's degenerate branch in float32, and ``torch.where`` promotes, so
    float16 and bfloat16 scores come back as float32; float64 stays float64.
    """
    return np.dtype(jnp.promote_types(_compute_dtype(dtype), jnp.float32))


# (exponent bits, mantissa bits) of the dtypes torch computes in float32 and rounds after
# every operation.
_HALF_BITS = {np.dtype(jnp.float16): (5, 10), np.dtype(jnp.bfloat16): (8, 7)}


def _math(x, threshold, min_val, max_val):
    dtype = _compute_dtype(x.dtype)
    out = result_dtype(x.dtype)
    x = x.astype(dtype)
    # The statistics are anomalib's float32 buffers.
    t, lo, hi = (jnp.asarray(v, jnp.float32) for v in (threshold, min_val, max_val))
    t = jnp.where(jnp.isnan(t), (hi + lo) / 2, t)
    value_range = hi - lo
    zero_range = value_range == 0
    safe_range = jnp.where(zero_range, jnp.ones_like(value_range), value_range)
    # torch casts a 0-d float32 operand to the scores' dtype (a dimensioned tensor wins).
    td = t.astype(dtype)
    # XLA turns a division by a broadcast scalar into a multiplication by its reciprocal,
    # 1 ulp off torch's true division; behind a barrier the divisor is an array it cannot
    # see through, and the division stays a division.
    bits = _HALF_BITS.get(np.dtype(dtype))
    if bits is None:
        divisor = jax.lax.optimization_barrier(jnp.broadcast_to(safe_range.astype(dtype), x.shape))
        normalized = jnp.clip((x - td) / divisor + 0.5, 0, 1)
    else:
        # torch computes each float16/bfloat16 operation in float32 and rounds its result
        # to the half dtype; XLA may keep the excess precision between fused operations
        # (xla_allow_excess_precision), so each rounding is written out. As torch does, the
        # threshold is rounded to the half dtype before the subtraction, and the division
        # takes the float32 range as it is.
        def rounded(y):
            y_half = jax.lax.reduce_precision(y, *bits)
            if np.dtype(dtype) != np.dtype(jnp.float16):
                return y_half  # bfloat16's subnormals are float32's: XLA flushes them
            # reduce_precision flushes float16's subnormals (below 2**-14), which torch
            # keeps: round those to float16's subnormal step, 2**-24, half to even.
            tiny = jnp.abs(y) < 2.0**-14
            return jnp.where(tiny, jnp.round(y * 2.0**24) * 2.0**-24, y_half)

        f32 = jnp.float32
        divisor = jax.lax.optimization_barrier(jnp.broadcast_to(safe_range, x.shape))
        diff = rounded(x.astype(f32) - td.astype(f32))
        scaled = rounded(diff / divisor)
        normalized = jnp.clip(rounded(scaled + 0.5), 0, 1).astype(dtype)
    degenerate = jnp.where(x > td, 1.0, jnp.where(x < td, 0.0, 0.5)).astype(jnp.float32)
    normalized = jnp.where(zero_range, degenerate.astype(out), normalized.astype(out))
    has_range = ~jnp.isnan(lo) & ~jnp.isnan(hi)
    return jnp.where(has_range, normalized, x.astype(out))


_normalize_jit = jax.jit(_math)


def normalize_anomalib2(
    targets: ArrayLike, threshold: ArrayLike, min_val: ArrayLike, max_val: ArrayLike
) -> jax.Array:
    r"""anomalib 2.x's normalization: ``clamp((x - t) / (max - min) + 0.5, 0, 1)``.

    Unlike ``jaxnorm.normalize`` (anomalib 0.x's callback), NaN is a value here, with
    anomalib 2's meaning: a NaN ``threshold`` becomes ``(min_val + max_val) / 2``, and a NaN
    ``min_val`` or ``max_val`` (no statistics) returns the scores unchanged. A zero range
    gives 0 below the threshold, 0.5 at it and 1 above it.

    Jitted; the scalars are traced arguments, so new values never recompile.

    Args:
      targets: scores of any shape (a jax or numpy array, or a number).
      threshold: the raw score that maps to 0.5, or NaN.
      min_val: the smallest validation score, or NaN.
      max_val: the largest validation score, or NaN.

    Returns:
      The normalized scores, float32 for scores of 32 bits or fewer (float64 stays float64
      under x64), as anomalib's ``PostProcessor`` returns them.

    Raises:
      ValueError: ``targets`` is not numeric, or a scalar is not one number.
    """
    targets = validation.as_array("targets", targets)
    scalars = []
    for name, value in (("threshold", threshold), ("min_val", min_val), ("max_val", max_val)):
        if validation.is_tracer(value):
            scalars.append(value)
            continue
        arr = validation.as_array(name, value)
        if np.ndim(arr) != 0:
            raise ValueError(
                f"{name}: expected one number, got shape {tuple(np.shape(arr))}; pass a scalar "
                "(anomalib's buffers are 0-d)."
            )
        scalars.append(arr)
    return _normalize_jit(targets, *scalars)


def _postprocess(values, params, cuts, labels):
    labels = dict(labels)
    out = {}
    for key, x in values.items():
        row = params[ROWS[key]]
        y = _math(x, row[0], row[1], row[2])
        out[key] = y
        if key in labels:
            # anomalib compares the normalized scores with `1 - sensitivity` (float32).
            out[labels[key]] = y > cuts[ROWS[key]].astype(y.dtype)
    return out


_postprocess_jit = jax.jit(_postprocess, static_argnames="labels")


def postprocess(
    values: Mapping[str, jax.Array],
    params: jax.Array,
    cuts: jax.Array,
    labels: tuple[tuple[str, str], ...] = (),
) -> dict[str, jax.Array]:
    """anomalib 2's ``post_process_batch`` for a batch, in one jitted dispatch.

    Args:
      values: ``{"pred_score": ..., "anomaly_map": ...}`` (either may be absent).
      params: float32 ``[[threshold, min, max] image, [threshold, min, max] pixel]``; NaN
        where anomalib's buffers are NaN.
      cuts: float32 ``[image, pixel]`` label thresholds on normalized scores
        (``1 - sensitivity``).
      labels: ``(value key, label key)`` pairs to threshold, e.g.
        ``(("pred_score", "pred_label"),)``.

    Returns:
      The normalized values under their keys, and a boolean array under each label key.
    """
    unknown = sorted(set(values) - set(ROWS))
    if unknown:
        raise ValueError(f"postprocess: unknown keys {unknown}; expected {sorted(ROWS)}.")
    return _postprocess_jit(dict(values), params, cuts, labels=tuple(labels))
