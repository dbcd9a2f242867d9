"""Statistics reduced across JAX processes (``jax.distributed``), with JAX's own collectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxnorm._src.minmax import MinMax
from jaxnorm._src.stats import NormalizationStats

# Counts travel as two int32 words each, so they stay exact without x64:
# count = high * 2**31 + low, with 0 <= low < 2**31.
_WORD_BITS = 31
_WORD_MASK = (1 << _WORD_BITS) - 1
_COUNT_LIMIT = 1 << (2 * _WORD_BITS)  # |count| < 2**62: high fits in int32


def allreduce_across_processes(
    mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All-reduces host statistics over every JAX process: min, max and exact sum.

    This is the ``Reducer`` that ``MinMaxNormalizationHook(reducer="auto")`` uses at
    ``on_validation_epoch_end`` when ``jax.process_count() > 1``.

    It is a collective: call it on every process, the same number of times and in the same
    order, with arrays of the same shapes, after ``jax.distributed.initialize``. A process
    that saw no data passes empty statistics (``+inf`` mins, ``-inf`` maxs, zero counts),
    the identity, and must still call it. With one process it returns copies of its inputs.

    The arrays are gathered in one ``multihost_utils.process_allgather`` call (floats
    bit-cast to int32, counts split into 31-bit words) and reduced on the host, so counts
    are exact beyond 2**31 even without ``jax_enable_x64``.

    Args:
      mins: float32 [k] minima of this process (``+inf`` where it saw nothing).
      maxs: float32 [k] maxima of this process (``-inf`` where it saw nothing).
      counts: int64 [m] counters of this process, summed across processes; each
        ``|count| < 2**62``.

    Returns:
      ``(mins, maxs, counts)``: the elementwise min over processes of ``mins``, max of
      ``maxs`` and sum of ``counts``, the same on every process.

    Raises:
      ValueError: shapes or dtypes that cannot be reduced, or a count out of range.
      OverflowError: a sum of counts does not fit in int64.
    """
    mins, maxs, counts = _check(mins, maxs, counts)
    if jax.process_count() == 1:
        return mins.copy(), maxs.copy(), counts.copy()
    rows = multihost_utils.process_allgather(_pack(mins, maxs, counts))
    return _reduce_rows(np.asarray(rows), mins.size, counts.size)


def _pack(mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One int32 row: float bits of mins and maxs, then low and high words of counts."""
    return np.concatenate(
        [
            mins.view(np.int32),
            maxs.view(np.int32),
            (counts & _WORD_MASK).astype(np.int32),
            (counts >> _WORD_BITS).astype(np.int32),
        ]
    )


def _reduce_rows(rows: np.ndarray, k: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduces ``[processes, 2k + 2m]`` packed rows on the host: min, max and exact sum."""
    all_mins = np.ascontiguousarray(rows[:, :k]).view(np.float32)
    all_maxs = np.ascontiguousarray(rows[:, k : 2 * k]).view(np.float32)
    low = rows[:, 2 * k : 2 * k + m].astype(np.int64).sum(axis=0)
    high = rows[:, 2 * k + m :].astype(np.int64).sum(axis=0)
    totals = [(int(h) << _WORD_BITS) + int(lo) for h, lo in zip(high, low, strict=True)]
    if any(not -(1 << 63) <= t < 1 << 63 for t in totals):
        raise OverflowError(f"counts: a sum over processes ({totals}) does not fit in int64.")
    return all_mins.min(axis=0), all_maxs.max(axis=0), np.array(totals, np.int64)


def reduce_stats(stats: NormalizationStats | MinMax) -> NormalizationStats | MinMax:
    """The statistics merged over every JAX process; the same on each.

    For loops that fold statistics themselves (``jaxnorm.update_stats`` or ``MinMax.update``
    in their own jitted step) on process-local data: call it once after validation, on every
    process (it is a collective), before normalizing. The hook does this by itself with
    ``reducer="auto"``. Statistics computed by a ``jit`` over a global mesh are global
    already; reducing them again is harmless (``merge`` is idempotent).

    Args:
      stats: a ``NormalizationStats`` or a ``MinMax`` of scalars; empty on a process that saw
        no data.

    Returns:
      The same type, with float32 scalars on the default device.
    """
    if isinstance(stats, MinMax):
        parts = [stats]
    elif isinstance(stats, NormalizationStats):
        parts = [stats.image, stats.pixel]
    else:
        raise ValueError(
            f"stats: expected NormalizationStats or MinMax, got {type(stats).__name__}."
        )
    mins = np.array([_host_scalar("min", p.min) for p in parts], np.float32)
    maxs = np.array([_host_scalar("max", p.max) for p in parts], np.float32)
    mins, maxs, _ = allreduce_across_processes(mins, maxs, np.zeros((0,), np.int64))
    out = [
        MinMax(min=jnp.float32(lo), max=jnp.float32(hi)) for lo, hi in zip(mins, maxs, strict=True)
    ]
    return out[0] if isinstance(stats, MinMax) else NormalizationStats(image=out[0], pixel=out[1])


def _host_scalar(name: str, x) -> np.float32:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(
                f"stats.{name}: a global array sharded across processes; statistics must be "
                "scalars (fold with MinMax.reduce or in a jit over the global mesh first)."
            )
        x = x.addressable_data(0)
    x = np.asarray(jax.device_get(x))
    if x.ndim != 0:
        raise ValueError(
            f"stats.{name}: expected a scalar, got shape {x.shape}; merge a stacked state "
            "with .reduce() first."
        )
    return np.float32(x)


def _check(mins, maxs, counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mins = np.ascontiguousarray(mins, np.float32).reshape(-1)
    maxs = np.ascontiguousarray(maxs, np.float32).reshape(-1)
    counts_in = np.asarray(counts)
    if counts_in.size and not np.issubdtype(counts_in.dtype, np.integer):
        raise ValueError(f"counts: expected integers, got dtype {counts_in.dtype}.")
    counts = np.ascontiguousarray(counts_in, np.int64).reshape(-1)
    if mins.shape != maxs.shape:
        raise ValueError(
            f"mins has shape {mins.shape} but maxs has shape {maxs.shape}; pass one min and "
            "one max per statistic."
        )
    if np.any((counts < -_COUNT_LIMIT) | (counts >= _COUNT_LIMIT)):
        raise ValueError(f"counts: {counts.tolist()} holds a value beyond +-2**62.")
    return mins, maxs, counts
