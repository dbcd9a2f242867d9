"""anomalib 2.x's normalization (``PostProcessor._normalize``) and labels, as jitted functions.

anomalib >= 2 keeps its statistics in NaN-initialised buffers and normalizes with rules of its
own, which differ from the 0.x callback's ``jaxnorm.normalize``:

- a NaN threshold falls back to the midpoint ``(min + max) / 2``;
- a zero range gives 0, 0.5 or 1 by comparison with the threshold;
- NaN statistics (``min`` or ``max``: never validated) pass the scores through unchanged;
- the result is clamped to [0, 1].

The math is anomalib's, operation for operation and in the same dtypes (torch computes the
threshold's midpoint and the range in the buffers' dtype, ``(x - t) / range + 0.5`` in the
scores' dtype and the degenerate branch in float32), so that float32, float16 and bfloat16
results are bit-identical to anomalib's, for float32, float16 and bfloat16 buffers alike
(torch rounds each half-precision operation to the half dtype, and so does this code,
float16 subnormals included).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import validation

ArrayLike = validation.ArrayLike

# anomalib 2's buffers in ``postprocess``'s ``buffers``, in this order.
BUFFERS = (
    "_image_threshold",
    "_pixel_threshold",
    "image_min",
    "image_max",
    "pixel_min",
    "pixel_max",
)
# Which buffers each key uses: (its threshold, the other one for threshold matching, min, max).
_USES: Mapping[str, tuple[int, int, int, int]] = {
    "pred_score": (0, 1, 2, 3),
    "anomaly_map": (1, 0, 4, 5),
}
# Which cut (``1 - sensitivity``) each key's label uses.
_CUT: Mapping[str, int] = {"pred_score": 0, "anomaly_map": 1}


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


def _rounder(dtype):
    """Rounds a float32 result to ``dtype`` as torch rounds each float16/bfloat16 operation
    (it computes in float32 and rounds the result); the identity for wider dtypes.

    XLA may keep excess precision between fused operations (xla_allow_excess_precision), so
    each rounding is written out.
    """
    bits = _HALF_BITS.get(np.dtype(dtype))
    if bits is None:
        return lambda y: y

    def rounded(y):
        y_half = jax.lax.reduce_precision(y, *bits)
        if np.dtype(dtype) != np.dtype(jnp.float16):
            return y_half  # bfloat16's subnormals are float32's: XLA flushes them
        # reduce_precision flushes float16's subnormals (below 2**-14), which torch keeps:
        # round those to float16's subnormal step, 2**-24, half to even.
        tiny = jnp.abs(y) < 2.0**-14
        return jnp.where(tiny, jnp.round(y * 2.0**24) * 2.0**-24, y_half)

    return rounded


def _stats_dtype(*scalars) -> np.dtype:
    """The dtype anomalib computes its threshold midpoint and range in: the buffers' own
    when they share float16 or bfloat16 (``module.half()``, ``.to(torch.bfloat16)``), else
    float32 (its buffers' dtype; float64 statistics are float32 here without x64)."""
    dtypes = {np.dtype(jnp.result_type(v)) for v in scalars}
    if len(dtypes) == 1 and next(iter(dtypes)) in _HALF_BITS:
        return dtypes.pop()
    return np.dtype(jnp.float32)


def _math(x, threshold, min_val, max_val):
    dtype = _compute_dtype(x.dtype)
    out = result_dtype(x.dtype)
    x = x.astype(dtype)
    # anomalib's buffers: float32, or half precision after module.half() (then the midpoint
    # and the range are computed, and rounded, in it). Their values are float32 exactly.
    rs = _rounder(_stats_dtype(threshold, min_val, max_val))
    t, lo, hi = (jnp.asarray(v).astype(jnp.float32) for v in (threshold, min_val, max_val))
    t = jnp.where(jnp.isnan(t), rs(rs(hi + lo) / 2), t)
    value_range = rs(hi - lo)
    zero_range = value_range == 0
    safe_range = jnp.where(zero_range, jnp.ones_like(value_range), value_range)
    # torch casts a 0-d operand to the scores' dtype (a dimensioned tensor wins).
    td = t.astype(dtype)
    # XLA turns a division by a broadcast scalar into a multiplication by its reciprocal,
    # 1 ulp off torch's true division; behind a barrier the divisor is an array it cannot
    # see through, and the division stays a division.
    if np.dtype(dtype) not in _HALF_BITS:
        divisor = jax.lax.optimization_barrier(jnp.broadcast_to(safe_range.astype(dtype), x.shape))
        normalized = jnp.clip((x - td) / divisor + 0.5, 0, 1)
    else:
        # torch computes each float16/bfloat16 operation in float32 and rounds its result
        # to the half dtype. As torch does, the threshold is rounded to the half dtype
        # before the subtraction, and the division takes the range's value as it is.
        rounded = _rounder(dtype)
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


def _postprocess(values, buffers, cuts, labels, matching):
    labels = dict(labels)
    out = {}
    for key, x in values.items():
        own, other, lo, hi = _USES[key]
        t = buffers[own]
        if matching:  # anomalib's threshold properties: a NaN threshold takes the other one
            t = jnp.where(jnp.isnan(t), buffers[other], t)
        y = _math(x, t, buffers[lo], buffers[hi])
        out[key] = y
        if key in labels:
            # anomalib compares the normalized scores with `1 - sensitivity` (float32).
            out[labels[key]] = y > cuts[_CUT[key]].astype(y.dtype)
    return out


_postprocess_jit = jax.jit(_postprocess, static_argnames=("labels", "matching"))


def postprocess(
    values: Mapping[str, jax.Array],
    buffers: jax.Array,
    cuts: jax.Array,
    labels: tuple[tuple[str, str], ...] = (),
    *,
    matching: bool = True,
) -> dict[str, jax.Array]:
    """anomalib 2's ``post_process_batch`` for a batch, in one jitted dispatch.

    Args:
      values: ``{"pred_score": ..., "anomaly_map": ...}`` (either may be absent).
      buffers: anomalib's buffers as they are, in ``BUFFERS``' order (NaN where not set),
        float32, float16 or bfloat16: the threshold matching, the midpoint of a NaN
        threshold and the range are computed here, in their dtype, as anomalib's properties
        and ``_normalize`` compute them.
      cuts: float32 ``[image, pixel]`` label thresholds on normalized scores
        (``1 - sensitivity``).
      labels: ``(value key, label key)`` pairs to threshold, e.g.
        ``(("pred_score", "pred_label"),)``.
      matching: anomalib's ``enable_threshold_matching``.

    Returns:
      The normalized values under their keys, and a boolean array under each label key.
    """
    unknown = sorted(set(values) - set(_USES))
    if unknown:
        raise ValueError(f"postprocess: unknown keys {unknown}; expected {sorted(_USES)}.")
    return _postprocess_jit(
        dict(values), buffers, cuts, labels=tuple(labels), matching=bool(matching)
    )
