"""Test and predict: every key of a batch normalized in one jitted call.

``normalize_all`` takes a dict of arrays; ``normalize_positional`` the arrays of a fixed key
layout passed positionally (the Lightning adapters' steady path), with an inline variant for
tiny batches on the CPU (see ``runs_rowwise``). Both take the thresholds and statistics as
one device array, ``[[t, min, max] image, [t, min, max] pixel]``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

from jaxnorm._src.normalize import formula
from jaxnorm._src.stats import IMAGE, NORMALIZED_KEYS, PIXEL

# The row of the parameters each statistic uses.
ROWS = {IMAGE: 0, PIXEL: 1}


@jax.jit
def normalize_all(values: dict[str, jax.Array], params: jax.Array) -> dict[str, jax.Array]:
    """Normalizes every key of ``values`` in one call.

    Args:
      values: arrays keyed by ``pred_scores``, ``anomaly_maps`` or ``box_scores`` (padded).
      params: ``[[image threshold, min, max], [pixel threshold, min, max]]``.
    """
    out = {}
    for key, x in values.items():
        t, lo, hi = params[ROWS[NORMALIZED_KEYS[key]]]
        out[key] = formula(x, t, lo, hi)
    return out


# XLA's CPU client runs an executable in the calling thread when its HloCostAnalysis counts
# fewer than 1000 flops, and otherwise hands it to a worker thread; that hand-over (two
# thread switches) costs more than normalizing a few thousand values, and a caller that
# reads the result at once (the Lightning shim: torch reads it on the host) pays all of it.
# A while loop's body counts once, so mapping over the rows of a tiny batch keeps the cost
# under the mark and the call inline. About 10 flops per value (a float16 value's casts
# included): a row of up to ``INLINE_ROW`` values stays under 1000. Not bfloat16: XLA's
# CPU compiler widens it to float32 around the loop, over whole arrays.
_CHEAP_FLOPS = 1000
_FLOPS_PER_VALUE = 10
INLINE_ROW = 80
INLINE_ROWS = 64  # more rows would cost more in loop steps than the hand-over
_INLINE_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float16)})


def runs_rowwise(shapes: tuple[tuple[int, ...], ...], dtypes: tuple) -> bool:
    """Whether ``normalize_positional`` should map over the rows of arrays of ``shapes`` and
    ``dtypes`` (numpy's) on a CPU: float32 or float16, leading sizes that agree and are
    small, small rows, and a batch that would not run inline already as a whole."""
    if not shapes or any(len(s) == 0 for s in shapes):
        return False
    if any(np.dtype(d) not in _INLINE_DTYPES for d in dtypes):
        return False
    n = shapes[0][0]
    if not 1 < n <= INLINE_ROWS or any(s[0] != n for s in shapes):
        return False
    row = sum(int(np.prod(s[1:], dtype=np.int64)) for s in shapes)
    return row <= INLINE_ROW and n * row * _FLOPS_PER_VALUE >= _CHEAP_FLOPS


@functools.cache
def normalize_positional(keys: tuple[str, ...], rowwise: bool):
    """``normalize_all`` for the arrays of ``keys`` passed positionally: a jitted
    ``fn(params, *arrays) -> tuple``, one per layout of keys (no pytree of dict keys to
    flatten at each call).

    Args:
      keys: the output keys the arrays hold, in order (``pred_scores``, ``anomaly_maps``).
      rowwise: map over the shared leading axis (see ``runs_rowwise``): the same values,
        run inline on a CPU.
    """
    rows = tuple(ROWS[NORMALIZED_KEYS[key]] for key in keys)

    def each(params, xs):
        return tuple(formula(x, *params[w]) for x, w in zip(xs, rows, strict=True))

    if rowwise:

        def fn(params, *xs):
            return lax.map(lambda row: each(params, row), xs)

    else:

        def fn(params, *xs):
            return each(params, xs)

    fn.__name__ = "normalize_" + "_".join(keys) + ("_rowwise" if rowwise else "")
    return jax.jit(fn)
