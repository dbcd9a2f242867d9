"""Min-max normalization of anomaly scores around a threshold (anomalib 0.x's formula), for
one array (``normalize``) and for a dict of model outputs (``normalize_outputs``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import validation
from jaxnorm._src.minmax import MinMax
from jaxnorm._src.stats import IMAGE, NORMALIZED_KEYS, PIXEL, NormalizationStats, as_stats

ArrayLike = validation.ArrayLike

_FINITE_HINT = "it must be a finite number"
_EMPTY_HINT = (
    "statistics that are not finite come from a MinMax that saw no finite value: run "
    "validation (or load saved statistics) before normalizing"
)


def output_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype ``normalize`` returns: a floating dtype is kept, anything else is float32."""
    return dtype if jnp.issubdtype(dtype, jnp.floating) else np.dtype(jnp.float32)


def formula(targets, threshold, min_val, max_val):
    """The math of ``normalize`` on arrays, to trace inside a jitted function (no checks)."""
    out_dtype = output_dtype(targets.dtype)
    if targets.size == 0:
        # Nothing to compute; and jax's select fails to lower on an empty array sharded
        # over an explicit mesh axis ("Length of device assignment 1 ...").
        return targets.astype(out_dtype)
    compute = jnp.promote_types(out_dtype, jnp.float32)
    x = targets.astype(compute)
    threshold = jnp.asarray(threshold, compute)
    # (x - t) / (max - min), kept finite for any finite statistics: the range is halved
    # before subtracting (max - min overflows near +-3e38), and a huge range is scaled by a
    # power of two first, so that its reciprocal is never subnormal (flushed to 0 by XLA,
    # which would turn every score into 0.5). Both scalings are exact.
    half_range = 0.5 * jnp.asarray(max_val, compute) - 0.5 * jnp.asarray(min_val, compute)
    # Halves of equal tiny statistics flush to zero and may differ in sign (-0 - +0 = -0):
    # a range that is not positive is exactly +0, so a degenerate range scales by +inf.
    half_range = jnp.where(half_range > 0, half_range, jnp.zeros((), compute))
    big = half_range >= 2.0**62
    pre = jnp.where(big, jnp.asarray(2.0**-64, compute), jnp.asarray(1, compute))
    scale = 0.5 / (half_range * pre)
    d = x - threshold
    # x - t overflows to +-inf only where the result clips anyway: |x - t| is then beyond
    # float's max, which is at least half the range.
    # A degenerate range gives scale = inf: d * inf is -inf/+inf (clipped to 0/1) away from
    # the threshold and NaN at it, so the threshold itself is pinned to 0.5 explicitly.
    y = jnp.where(d == 0, 0.5, (d * pre) * scale + 0.5)
    return jnp.clip(y, 0, 1).astype(out_dtype)


_normalize = jax.jit(formula)


@jax.jit
def _normalize_packed(targets, params):
    """``_normalize`` with ``params = [threshold, min, max]``: one transfer, not three."""
    return formula(targets, params[0], params[1], params[2])


def pack(threshold: float, min_val: float, max_val: float) -> np.ndarray:
    """The host scalars of one call as one array (each scalar argument is its own transfer
    to an accelerator, which costs more than normalizing a batch of image scores)."""
    dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    return np.array([threshold, min_val, max_val], dtype)


def check_scalars(threshold: float, min_val: float, max_val: float, wide: bool) -> None:
    """Checks finite host scalars for one call: order, and the range of the compute dtype.

    Args:
      wide: the math runs in float64 (x64 on and float64 targets); else float32, where a
        larger value would become inf.
    """
    if max_val < min_val:
        raise ValueError(
            f"max_val ({max_val}) is smaller than min_val ({min_val}); pass statistics from a "
            "MinMax that has seen data."
        )
    if not wide:
        for name, value in (("threshold", threshold), ("min_val", min_val), ("max_val", max_val)):
            if abs(value) > validation.F32_MAX:
                raise ValueError(
                    f"{name} is {value}, beyond float32's range (+-{validation.F32_MAX:.4g}); the "
                    "math runs in float32 (float64 only for float64 targets under "
                    "jax_enable_x64)."
                )


@functools.lru_cache(maxsize=16)
def _device_pack(threshold: float, min_val: float, max_val: float, x64: bool) -> jax.Array:
    # Successive batches share their threshold and statistics: transfer them once.
    del x64  # part of the cache key: pack's dtype depends on it
    return jax.device_put(pack(threshold, min_val, max_val))


@functools.lru_cache(maxsize=16)
def _checked_pack(
    threshold: float, min_val: float, max_val: float, x64: bool, wide: bool
) -> jax.Array:
    # The checks of a value are cached with its transfer (exceptions are not cached).
    for name, value in (("threshold", threshold), ("min_val", min_val), ("max_val", max_val)):
        validation.host_scalar(name, value, _FINITE_HINT if name == "threshold" else _EMPTY_HINT)
    check_scalars(threshold, min_val, max_val, wide)
    return _device_pack(threshold, min_val, max_val, x64)


def _is_wide(dtype: np.dtype) -> bool:
    return dtype == np.float64 and bool(jax.config.jax_enable_x64)


def _check_host(threshold, min_val, max_val, *, wide: bool) -> np.ndarray:
    """The checks of ``_checked_pack``, as a host callback: on values, once they exist."""
    threshold, min_val, max_val = (
        validation.host_scalar(name, np.asarray(value)[()], hint)
        for name, value, hint in (
            ("threshold", threshold, _FINITE_HINT),
            ("min_val", min_val, _EMPTY_HINT),
            ("max_val", max_val, _EMPTY_HINT),
        )
    )
    check_scalars(threshold, min_val, max_val, wide)
    return np.bool_(True)


@functools.partial(jax.jit, static_argnames="wide")
def _normalize_checked(targets, threshold, min_val, max_val, *, wide: bool):
    """``_normalize`` whose scalars are checked on the host as soon as they are computed,
    while the caller moves on: bad values fail the computation. A pure callback, not an
    ``io_callback``, whose effect token would make the dispatch wait for them."""
    ok = jax.pure_callback(
        functools.partial(_check_host, wide=wide),
        jax.ShapeDtypeStruct((), jnp.bool_),
        threshold,
        min_val,
        max_val,
    )
    y = formula(targets, threshold, min_val, max_val)
    # ok is True whenever the callback returns; the select makes the result depend on it.
    return jnp.where(ok, y, jnp.zeros((), y.dtype))


# Scalars given as jax arrays, checked and packed, by the identity of the arrays (jax arrays
# are immutable, so the same objects hold the same values). Each entry keeps its arrays
# alive, so an id is never reused while its entry is here.
_ARRAY_PACKS: dict[tuple, tuple[tuple, jax.Array]] = {}
_ARRAY_PACKS_SIZE = 16


def _device_scalar(value) -> bool:
    """A concrete 0-d jax array (not a tracer): its shape is known without reading it."""
    return isinstance(value, jax.Array) and not validation.is_tracer(value) and value.ndim == 0


def _pack_key(threshold, min_val, max_val, x64: bool, dtype) -> tuple:
    # A float threshold by value (a sweep of thresholds over the same statistics), arrays by
    # identity; the entry's objects are compared with ``is`` on a hit.
    return (
        threshold if type(threshold) is float else id(threshold),
        id(min_val),
        id(max_val),
        x64,
        dtype,
    )


def _normalize_device_scalars(targets, scalars: tuple, x64: bool):
    """``normalize`` for scalars that are floats or 0-d jax arrays (at least one array),
    seen for the first time: checked and packed once they are computed."""
    wide = _is_wide(targets.dtype)
    if not all(type(v) is float or v.is_ready() for v in scalars):
        # Still being computed: checked on the host as they arrive, not waited for here.
        return _normalize_checked(targets, *scalars, wide=wide)
    threshold, min_val, max_val = validation.host_scalars(
        ("threshold", scalars[0], _FINITE_HINT),
        ("min_val", scalars[1], _EMPTY_HINT),
        ("max_val", scalars[2], _EMPTY_HINT),
    )
    params = _checked_pack(threshold, min_val, max_val, x64, wide)  # raises for bad values
    if len(_ARRAY_PACKS) >= _ARRAY_PACKS_SIZE:
        del _ARRAY_PACKS[next(iter(_ARRAY_PACKS))]
    _ARRAY_PACKS[_pack_key(*scalars, x64, targets.dtype)] = (scalars, params)
    return _normalize_packed(targets, params)


def _host_float(name: str, value, hint: str):
    """``value`` as a checked Python float when it is a number on the host; jax arrays and
    tracers unchanged."""
    if type(value) is float or isinstance(value, jax.Array):
        return value
    return validation.host_scalar(name, value, hint)


def normalize(
    targets: ArrayLike, threshold: ArrayLike, min_val: ArrayLike, max_val: ArrayLike
) -> jax.Array:
    """Maps raw anomaly scores to [0, 1] so that ``threshold`` lands at 0.5::

      normalize(x) = clip((x - threshold) / (max_val - min_val) + 0.5, 0, 1)

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

    Scalars given as 0-d jax arrays (``stats.min``, ``stats.max``) are not read at every
    call. The first call that sees those array objects reads and checks them on the host
    when they are computed already (which does not wait), and keeps the checked values on
    the device, keyed by the arrays' identity (jax arrays are immutable): later calls with
    the same arrays read nothing. A call whose arrays are still being computed does not wait
    for them either: the same checks run on the host as soon as the values exist (a jax host
    callback in the call), and bad values fail the computation, so reading the result
    raises jax's runtime error carrying the ``ValueError`` below. Never a silent NaN or 0.5.

    Returns:
      A jax array of the shape of ``targets``, with its dtype when floating (float16,
      bfloat16, float32, and float64 under x64), else float32.

    Raises:
      ValueError: ``targets`` is not numeric, a scalar is not finite, or
        ``max_val < min_val`` (empty statistics are ``+inf``/``-inf``: run validation or load
        statistics first), or a scalar is beyond float32's range while the math runs in
        float32 (for jax-array scalars still being computed, when the result is read, see
        above). Scalars given as tracers, inside the caller's ``jit``, are not checked:
        there, empty statistics (``+inf``/``-inf``) act as a zero range (0 below the
        threshold, 0.5 at it, 1 above), so check ``stats.is_empty`` outside the ``jit``
        (or pass the statistics as concrete arrays, which are checked).
    """
    targets = validation.as_array("targets", targets)
    x64 = bool(jax.config.jax_enable_x64)
    if not (type(threshold) is float and type(min_val) is float and type(max_val) is float):
        # Host numbers (ints, numpy scalars and 0-d arrays) as floats, so that beside jax
        # array statistics they take the paths that read those arrays once, not every call.
        threshold, min_val, max_val = (
            _host_float(name, value, hint)
            for name, value, hint in (
                ("threshold", threshold, _FINITE_HINT),
                ("min_val", min_val, _EMPTY_HINT),
                ("max_val", max_val, _EMPTY_HINT),
            )
        )
    if type(threshold) is float and type(min_val) is float and type(max_val) is float:
        # The common per-batch call: host floats, checked and transferred once per value.
        params = _checked_pack(threshold, min_val, max_val, x64, _is_wide(targets.dtype))
        return _normalize_packed(targets, params)
    hit = _ARRAY_PACKS.get(_pack_key(threshold, min_val, max_val, x64, targets.dtype))
    if hit is not None:
        held = hit[0]
        if (
            held[1] is min_val
            and held[2] is max_val
            and (held[0] is threshold or type(threshold) is float)
        ):
            # Statistics arrays seen, read and checked before: nothing to read.
            return _normalize_packed(targets, hit[1])
    scalars = (threshold, min_val, max_val)
    if all(type(v) is float or _device_scalar(v) for v in scalars):
        return _normalize_device_scalars(targets, scalars, x64)
    threshold, min_val, max_val = validation.host_scalars(
        ("threshold", threshold, _FINITE_HINT),
        ("min_val", min_val, _EMPTY_HINT),
        ("max_val", max_val, _EMPTY_HINT),
    )
    if isinstance(threshold, float) and isinstance(min_val, float) and isinstance(max_val, float):
        params = _checked_pack(threshold, min_val, max_val, x64, _is_wide(targets.dtype))
        return _normalize_packed(targets, params)
    if isinstance(min_val, float) and isinstance(max_val, float) and max_val < min_val:
        raise ValueError(
            f"max_val ({max_val}) is smaller than min_val ({min_val}); pass statistics from a "
            "MinMax that has seen data."
        )
    return _normalize(targets, threshold, min_val, max_val)


def normalize_outputs(
    outputs: Mapping,
    stats: NormalizationStats | MinMax,
    image_threshold,
    pixel_threshold,
) -> dict:
    """Returns a copy of ``outputs`` with scores, maps and boxes normalized: jittable.

    ``pred_scores`` use the image threshold and statistics, ``anomaly_maps`` and each array
    of ``box_scores`` the pixel ones (a single ``MinMax`` as ``stats`` serves both). Other
    keys pass through unchanged, and a dict without
    any of the three comes back as it is (the hook's ``normalize_batch`` raises instead).

    Called eagerly, the thresholds and statistics are checked as ``jaxnorm.normalize``
    checks them (empty statistics raise ``ValueError``). Inside ``jit`` they are tracers and
    are not: empty statistics then act as a zero range, so check ``stats.image.is_empty``
    and ``stats.pixel.is_empty`` before the loop.
    """
    if not isinstance(outputs, Mapping):
        raise ValueError(
            f"outputs: expected a dict of model outputs, got {type(outputs).__name__}."
        )
    stats = as_stats(stats, "normalize_outputs")
    thresholds = {IMAGE: image_threshold, PIXEL: pixel_threshold}
    out = dict(outputs)
    for key, which in NORMALIZED_KEYS.items():
        if key not in outputs:
            continue
        s = stats.get(which)
        if key == "box_scores":
            out[key] = [normalize(b, thresholds[which], s.min, s.max) for b in outputs[key]]
        else:
            out[key] = normalize(outputs[key], thresholds[which], s.min, s.max)
    return out
