"""Min-max normalization of anomaly scores around a threshold (anomalib 0.x's formula), for
one array (``normalize``) and for a dict of model outputs (``normalize_outputs``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import placement, validation
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


# -- scalars given as 0-d jax arrays (``stats.min``, ``stats.max``) --------------------------
#
# The arrays themselves go into every call: they are on the device already, so the values
# travel with the batch at no transfer, and no call computes with a value read earlier.
# What is kept is only that the scalars passed the checks (finite, max >= min, within the
# compute dtype's range), so that a steady loop does not read them on the host every call.
#
# Hit rule of ``_CHECKED``: an entry is valid for a call whose scalars are, position by
# position, the very same array objects (``is``: the entry keeps them alive, so their ids
# are never reused while it is here), or Python floats of the same value (keys are tagged
# ``(_ARRAY, id)`` or ``(_FLOAT, value)``, so a float that happens to equal an id never
# matches an array), for targets of the same dtype and the same ``x64``. Why a hit stays
# valid:
# - a new array object is a new key: checked again;
# - a jax array's value never changes (jax arrays are immutable): no in-place op, ``.data``
#   or ``load_state_dict`` exists for it, and ``np.asarray`` of a jax array is read-only;
# - a deleted or donated array: every call looks (``is_deleted``, ~0.05 us an array) and
#   raises jax's "Array has been deleted" error, hit or not;
# - ``deepcopy``/pickle of an array gives a new object: a new key;
# - dtype or device conversion gives a new object: a new key; statistics committed to other
#   devices than the targets are copied there at each call (``_placed``: no host wait);
# - a DLPack alias written in place (a torch tensor over the array's memory): jax documents
#   this as undefined behaviour for the jax array. The math still reads the memory as it is
#   now, so the result uses the new value, but the checks are not run again: a value written
#   this way that is not finite or breaks ``max >= min`` is not reported (see
#   docs/differences.md; checking at every call costs a host callback per call).
# An entry holds the scalars as given, the arrays the call takes (a float as a device
# scalar of its value, ``_device_float``), and whether any of those is committed.
_CHECKED: dict[tuple, tuple] = {}
_CHECKED_SIZE = 16
_ARRAY, _FLOAT = "array", "float"


def _device_scalar(value) -> bool:
    """A concrete 0-d jax array (not a tracer): its shape is known without reading it."""
    return isinstance(value, jax.Array) and not validation.is_tracer(value) and value.ndim == 0


def _checked_key(threshold, min_val, max_val, x64: bool, dtype) -> tuple:
    return (
        (_FLOAT, threshold) if type(threshold) is float else (_ARRAY, id(threshold)),
        (_FLOAT, min_val) if type(min_val) is float else (_ARRAY, id(min_val)),
        (_FLOAT, max_val) if type(max_val) is float else (_ARRAY, id(max_val)),
        x64,
        dtype,
    )


@functools.lru_cache(maxsize=16)
def _device_float(value: float, x64: bool) -> jax.Array:
    # A float beside array scalars (a threshold, usually), transferred once per value. Hit
    # rule: the same float value and x64. The array is never handed out (so never donated
    # or deleted), and a jax array's value cannot change.
    return jax.device_put(np.float64(value) if x64 else np.float32(value))


def _on_device(scalars: tuple, x64: bool) -> tuple:
    return tuple(_device_float(v, x64) if type(v) is float else v for v in scalars)


def _placed(targets, scalars: tuple) -> tuple:
    """``scalars`` (jax arrays) where a jitted call with ``targets`` can read them, whether
    they are computed yet or not (device to device copies, no host wait).

    Committed targets: statistics committed elsewhere are copied to the targets' devices.
    Uncommitted targets follow committed scalars, as in any jax computation; scalars
    committed to different devices all go to the first one's.
    """
    if isinstance(targets, jax.Array) and targets.committed:
        sharding = placement.target((targets,))
        if sharding is None:
            return scalars  # arrays across processes, pmap's shardings: jit places them
    else:
        placed = [v.sharding for v in scalars if v.committed]
        if all(p == placed[0] for p in placed):
            return scalars
        sharding = placed[0]
    return tuple(
        jax.device_put(v, sharding) if v.committed and v.sharding != sharding else v
        for v in scalars
    )


def _check_alive(scalars: tuple) -> None:
    """Raises jax's error for a deleted or donated array, before anything reads it
    (``is_ready()`` on a deleted array crashes the interpreter; jit's error for a donated
    one is an ``INVALID_ARGUMENT`` of the executable)."""
    for name, value in zip(("threshold", "min_val", "max_val"), scalars, strict=True):
        if type(value) is not float and value.is_deleted():
            raise RuntimeError(
                f"Array has been deleted with shape={value.aval.str_short()}: {name} was "
                "deleted or donated (e.g. to a jitted step with donate_argnums); pass the "
                "statistics that step returned, or arrays that are still alive."
            )


def _checked_arrays(targets, threshold, min_val, max_val, x64: bool) -> tuple | None:
    """The arrays a call takes for these scalars when ``_CHECKED`` holds them (see the hit
    rule), placed for ``targets``; else ``None``."""
    entry = _CHECKED.get(_checked_key(threshold, min_val, max_val, x64, targets.dtype))
    if entry is None:
        return None
    (t, lo, hi), arrays, committed = entry
    if (
        (t is not threshold and type(t) is not float)
        or (lo is not min_val and type(lo) is not float)
        or (hi is not max_val and type(hi) is not float)
    ):
        return None  # (defensive: the entry keeps its arrays alive, so ids are unique)
    if (
        (type(t) is not float and t.is_deleted())
        or (type(lo) is not float and lo.is_deleted())
        or (type(hi) is not float and hi.is_deleted())
    ):
        _check_alive((t, lo, hi))
    return _placed(targets, arrays) if committed else arrays


def _normalize_arrays(targets, scalars: tuple, x64: bool):
    """``normalize`` for scalars that are floats or concrete 0-d jax arrays (at least one
    array) not in ``_CHECKED``: checked, and kept there once computed."""
    _check_alive(scalars)
    wide = _is_wide(targets.dtype)
    arrays = _on_device(scalars, x64)
    if not all(v.is_ready() for v in scalars if type(v) is not float):
        # Still being computed: checked on the host as they arrive, not waited for here.
        return _normalize_checked(targets, *_placed(targets, arrays), wide=wide)
    threshold, min_val, max_val = validation.host_scalars(
        ("threshold", scalars[0], _FINITE_HINT),
        ("min_val", scalars[1], _EMPTY_HINT),
        ("max_val", scalars[2], _EMPTY_HINT),
    )
    check_scalars(threshold, min_val, max_val, wide)  # raises for bad values
    if len(_CHECKED) >= _CHECKED_SIZE:
        del _CHECKED[next(iter(_CHECKED))]
    committed = any(v.committed for v in arrays)
    _CHECKED[_checked_key(*scalars, x64, targets.dtype)] = (scalars, arrays, committed)
    return _normalize(targets, *(_placed(targets, arrays) if committed else arrays))


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

    Scalars given as 0-d jax arrays (``stats.min``, ``stats.max``) are passed to the
    computation as they are, at every call: nothing computes with a value read earlier, and
    nothing waits for them. Their checks are run once per array objects: the first call that
    sees them reads and checks them on the host when they are computed already (which does
    not wait), and later calls with the same objects read nothing. A call whose arrays are
    still being computed does not wait for them either: the same checks run on the host as
    soon as the values exist (a jax host callback in the call), and bad values fail the
    computation, so reading the result raises jax's runtime error carrying the
    ``ValueError`` below. Never a silent NaN or 0.5. Statistics committed to devices other
    than committed ``targets`` are copied to them (device to device, no host wait), whether
    they are computed yet or not. A deleted (or donated) array raises jax's
    ``RuntimeError`` ("Array has been deleted").

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
        threshold = _host_float("threshold", threshold, _FINITE_HINT)
        min_val = _host_float("min_val", min_val, _EMPTY_HINT)
        max_val = _host_float("max_val", max_val, _EMPTY_HINT)
    if type(threshold) is float and type(min_val) is float and type(max_val) is float:
        # The common per-batch call: host floats, checked and transferred once per value.
        params = _checked_pack(threshold, min_val, max_val, x64, _is_wide(targets.dtype))
        return _normalize_packed(targets, params)
    arrays = _checked_arrays(targets, threshold, min_val, max_val, x64)
    if arrays is not None:  # jax arrays seen and checked before: nothing to read
        return _normalize(targets, *arrays)
    scalars = (threshold, min_val, max_val)
    if all(type(v) is float or _device_scalar(v) for v in scalars):
        return _normalize_arrays(targets, scalars, x64)
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
