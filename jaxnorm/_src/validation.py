"""Input checks that run outside of jit and raise errors a person can act on."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any
StatsMode = Literal["shared", "separate"]
STATS_MODES = ("shared", "separate")
NonFinitePolicy = Literal["raise", "omit"]
# (mins, maxs, counts) -> the same, reduced over every participant: min, max and sum.
# mins/maxs are float32 [image, pixel]; counts int64 [n_values, n_nonfinite].
Reducer = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

# The largest float32: statistics and the math live in float32.
F32_MAX = float(np.finfo(np.float32).max)

_HINT = (
    "pass a jax.Array, a numpy array or a Python/numpy number "
    "(torch tensors go through torch_compat, or jax.dlpack.from_dlpack(t.detach()))"
)


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


# dtype -> True when it is a real number type (bool and complex are not). Checked once each.
_REAL_DTYPES: dict[np.dtype, bool] = {}


def _is_real(dtype: np.dtype) -> bool:
    ok = _REAL_DTYPES.get(dtype)
    if ok is None:
        ok = dtype != np.bool_ and bool(
            jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
        )
        _REAL_DTYPES[dtype] = ok
    return ok


def as_array(name: str, values: ArrayLike) -> jax.Array | np.ndarray:
    """Returns ``values`` as a jax or numpy array with a real numeric dtype.

    numpy arrays are copied (jax would read the caller's memory after the call returned,
    see below) and made ready for jax on the host (see ``host_ints_ok``): a non-native
    byte order (``>f4`` on a little-endian machine) is swapped, since jax would read the bytes
    as native ones; with x64 off, integers wider than 32 bits become float32 (jax would wrap
    them around to int32 silently; large ones round to the nearest float32, as any score
    does), and float64 becomes float32, where a value beyond float32's range is +-inf (as
    jax's own conversion gives, without numpy's overflow warning).

    Raises:
      ValueError: ``values`` is not an array or number, or its dtype is not a real number.
    """
    if isinstance(values, (jax.Array, np.ndarray)):
        arr = values
        if isinstance(arr, np.ma.MaskedArray):
            raise ValueError(
                f"{name}: a numpy masked array (shape {tuple(arr.shape)}); jax reads its data "
                "without the mask. Pass arr.data with MinMax.update(values, mask=~arr.mask), "
                "or arr.filled(value)."
            )
    elif isinstance(values, (bool, float, np.generic)):
        arr = np.asarray(values)
    elif isinstance(values, int):
        # beyond int64, numpy makes an object array: a float is the only faithful number
        arr = np.asarray(values if -(2**63) <= values < 2**63 else float(values))
    else:
        raise ValueError(f"{name}: expected an array, got {type(values).__name__}; {_HINT}.")
    dtype = arr.dtype
    if not _is_real(dtype):
        raise ValueError(
            f"{name}: dtype {dtype} (shape {tuple(arr.shape)}) is not a real number type; "
            "cast it to a floating dtype such as float32 first."
        )
    if isinstance(arr, np.ndarray):
        ready = host_ints_ok(arr)
        # jax reads an aligned numpy array in place (zero-copy on the CPU) whenever the
        # computation runs, which may be after the call returned: a caller that writes its
        # buffer at once (a reused output buffer, numpy's synchronous habit) would change the
        # result. So the caller's array is copied here, once (host_ints_ok's conversions are
        # copies already).
        arr = np.array(arr) if ready is values else ready
    return arr


def host_ints_ok(arr: np.ndarray) -> np.ndarray:
    """``arr`` as jax reads it faithfully: native byte order and, when x64 is off, 64-bit
    integers and floats as float32 (see ``as_array``)."""
    dtype = arr.dtype
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    if dtype.itemsize == 8 and dtype.kind in "iuf" and not jax.config.jax_enable_x64:
        with np.errstate(over="ignore"):  # beyond float32: +-inf, counted as non-finite
            arr = arr.astype(np.float32)
    return arr


def host_scalar(
    name: str, value: ArrayLike, hint: str = "it must be a finite number"
) -> float | jax.Array:
    """Returns a finite scalar as a Python float, or a tracer unchanged.

    Concrete values are checked here, outside jit, so that a NaN threshold or an empty
    statistic fails loudly instead of turning every score into NaN or 0.5. Tracers (a call
    inside the caller's own ``jit``) cannot be inspected and pass through.
    """
    if is_tracer(value):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name}: expected a scalar, got shape {jnp.shape(value)}.")
        return value
    if hasattr(value, "item") and not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        # e.g. a torch tensor: converting it here would hide a device transfer.
        raise ValueError(f"{name}: expected a float or a 0-d array, got {type(value).__name__}.")
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.ndim(value) != 0:
            raise ValueError(
                f"{name}: expected a scalar, got shape {tuple(np.shape(value))}; pass one value."
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}.")
    try:
        value = float(value)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"{name} is {value}, beyond float64's range; {hint}.") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; {hint}.")
    return value


def host_scalars(*items: tuple[str, ArrayLike, str]) -> list[float | jax.Array]:
    """``host_scalar`` over ``(name, value, hint)`` items.

    Statistics usually arrive as 0-d jax arrays (``MinMax.min``): they are fetched to the
    host to be checked, which waits for them to be computed.
    """
    on_device = [
        v for _, v, _ in items if isinstance(v, jax.Array) and not is_tracer(v) and v.ndim == 0
    ]
    # np.asarray reads a ready array's cached host copy; jax.device_get costs ~10x more.
    fetched = iter([np.asarray(v) for v in on_device])
    out = []
    for name, value, hint in items:
        if isinstance(value, jax.Array) and not is_tracer(value) and value.ndim == 0:
            value = next(fetched)
        out.append(host_scalar(name, value, hint))
    return out


def check_mask(mask: ArrayLike, shape: tuple[int, ...]) -> jax.Array | np.ndarray:
    """Checks that ``mask`` is boolean and broadcasts to ``shape``."""
    if not isinstance(mask, (jax.Array, np.ndarray)):
        raise ValueError(f"mask: expected a boolean array, got {type(mask).__name__}.")
    if np.dtype(mask.dtype) != np.bool_:
        raise ValueError(f"mask: dtype {mask.dtype} is not bool; pass `mask != 0` or a bool array.")
    try:
        np.broadcast_shapes(tuple(mask.shape), shape)
        ok = np.broadcast_shapes(tuple(mask.shape), shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask: shape {tuple(mask.shape)} does not broadcast to the values' shape {shape}; "
            "give the mask the values' shape."
        )
    return mask


def loaded_stats(source: str, lo_key: str, lo: Any, hi_key: str, hi: Any) -> tuple[float, float]:
    """Checks a ``(min, max)`` pair that comes from outside and returns it as Python floats.

    For statistics that enter from a checkpoint, a state dict, JSON metadata or ``set_stats``:
    they were not folded by jaxnorm, so nothing guarantees they are usable. The empty state
    (``min = +inf``, ``max = -inf``, what ``MinMax.empty()`` holds) passes: it means "no
    statistics", which test and predict report with ``StatisticsMissingError``.

    Args:
      source: where the values come from, for the message (e.g. ``"checkpoint"``).
      lo_key: the name of the minimum there (e.g. ``"normalization_metrics.min"``).
      lo: the minimum: a number, or an array or tensor with one element.
      hi_key: the name of the maximum there.
      hi: the maximum.

    Raises:
      ValueError: naming the source, the key and the value, when a value is not one real
        number, is NaN or infinite (other than the empty pair), does not fit in float32
        (statistics are float32), or when ``max < min``.
    """
    values = []
    for key, value in ((lo_key, lo), (hi_key, hi)):
        shape = tuple(getattr(value, "shape", ()))
        if shape and int(np.prod(shape)) != 1:
            raise ValueError(
                f"{source}: '{key}' has shape {shape}; expected one number (a 0-d array)."
            )
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"{source}: '{key}' is {value!r} ({type(value).__name__}); expected a number."
            )
        try:
            values.append(float(value))
        except OverflowError:  # a Python int beyond float64 (JSON integers are unbounded)
            digits = len(str(abs(value)))
            raise ValueError(
                f"{source}: '{key}' is an integer of {digits} digits, beyond float64's range "
                f"(and float32's, +-{F32_MAX:.4g}, where statistics live); rescale the scores "
                "or load the statistics that were saved."
            ) from None
    flo, fhi = values
    if flo == math.inf and fhi == -math.inf:
        return flo, fhi
    for key, value in ((lo_key, flo), (hi_key, fhi)):
        if not math.isfinite(value):
            raise ValueError(
                f"{source}: '{key}' is {value}; normalization statistics must be finite (or "
                "both empty: min=+inf, max=-inf). They come from a run whose scores were not "
                "finite: validate again (nonfinite='raise' names the bad output) or load other "
                "statistics."
            )
        if abs(value) > F32_MAX:
            raise ValueError(
                f"{source}: '{key}' is {value}, beyond float32's range (+-{F32_MAX:.4g}); "
                "statistics are float32: rescale the scores."
            )
    if fhi < flo:
        raise ValueError(
            f"{source}: '{hi_key}' ({fhi}) is smaller than '{lo_key}' ({flo}); these are not "
            "statistics of any scores: load the pair that was saved together."
        )
    return flo, fhi


def checked_stats(
    source: str,
    pairs: Mapping[str, tuple[object, object]],
    keys: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, tuple[float, float]]:
    """``loaded_stats`` over ``{"image": (lo, hi), "pixel": (lo, hi)}`` that come from outside.

    ``keys`` names each pair's values in ``source`` (default ``"image.min"``, ...). A pair
    given twice (the same objects, as shared statistics hold them) is read once.
    """
    host: dict[str, tuple[float, float]] = {}
    read: dict[tuple[int, int], tuple[float, float]] = {}
    for which, (lo, hi) in pairs.items():
        ids = (id(lo), id(hi))
        if ids not in read:
            lo_key, hi_key = (keys or {}).get(which, (f"{which}.min", f"{which}.max"))
            read[ids] = loaded_stats(source, lo_key, lo, hi_key, hi)
        host[which] = read[ids]
    return host


def check_threshold(name: str, value) -> float:
    """A threshold from a setter, a state dict or JSON, as a finite float in float32's range."""
    value = host_scalar(name, value)
    if not isinstance(value, float):
        raise ValueError(f"{name}: pass a concrete number, not a traced value.")
    if abs(value) > F32_MAX:
        raise ValueError(
            f"{name} is {value}, beyond float32's range (+-{F32_MAX:.4g}), where the "
            "statistics live; pass a threshold in raw-score units."
        )
    return value


def check_nonfinite(nonfinite: str) -> NonFinitePolicy:
    """The ``nonfinite`` option: ``"raise"`` or ``"omit"``."""
    if nonfinite not in ("raise", "omit"):
        raise ValueError(
            f"nonfinite={nonfinite!r}: expected 'raise' (NaN/inf validation scores raise "
            "jaxnorm.NonFiniteScoresError) or 'omit' (they are skipped)."
        )
    return nonfinite  # type: ignore[return-value]


def check_stats_mode(stats: str) -> StatsMode:
    """The ``stats`` option: ``"shared"`` or ``"separate"``."""
    if stats not in STATS_MODES:
        raise ValueError(f"stats={stats!r}: expected one of {STATS_MODES}.")
    return stats  # type: ignore[return-value]


def check_flag(name: str, value: Any) -> bool:
    """A boolean option (numpy's bool too); anything else is not read as a flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{name}={value!r}: expected True or False (a {type(value).__name__} "
            "is not read as a flag)."
        )
    return bool(value)


def check_reducer(value: Any) -> Reducer | Literal["auto"] | None:
    """The ``reducer`` option: ``"auto"``, ``None`` or a callable."""
    if not (value is None or value == "auto" or (callable(value) and not isinstance(value, str))):
        raise ValueError(
            f"reducer={value!r}: expected 'auto', None or a callable "
            "(mins, maxs, counts) -> (mins, maxs, counts), see jaxnorm.Reducer."
        )
    return value


def check_reduced(out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reducer's output, checked: three arrays of two values each."""
    try:
        mins, maxs, counts = (np.asarray(a) for a in out)
        ok = mins.shape == maxs.shape == counts.shape == (2,) and counts.dtype.kind in "iuf"
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"reducer returned {out!r}; expected (mins, maxs, counts) like its arguments: "
            "float arrays [image, pixel] reduced with min and max, and the integer counts "
            "[n_values, n_nonfinite] summed (see jaxnorm.Reducer)."
        )
    return mins, maxs, counts


def check_rows(key: str, x: Any, valid_rows: Any) -> int:
    """``valid_rows`` of a batch its caller padded: an int that fits ``x``'s leading axis."""
    if isinstance(valid_rows, bool) or not isinstance(valid_rows, (int, np.integer)):
        raise ValueError(f"valid_rows={valid_rows!r}: expected an int.")
    if np.ndim(x) == 0 or not 0 <= valid_rows <= x.shape[0]:
        raise ValueError(
            f"{key}: valid_rows={valid_rows} does not fit its shape {tuple(np.shape(x))}; "
            "pass the number of real rows of the padded leading axis."
        )
    return int(valid_rows)
