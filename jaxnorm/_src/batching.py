"""Bucketed batch sizes: the leading axis padded to a power of two.

``jit`` compiles once per input shape. A loop whose batch size varies (a short last batch,
per-request inference) would compile the hook's fused call once per size. Instead, per
phase (validation; test and predict) and per output key:

- the first leading size seen runs at its exact shape, so a steady loop never pads, copies
  or waits for anything;
- a size that is a power of two runs at its exact shape too (it is its own bucket);
- any other size is padded to the next power of two, with a validity mask built on the
  device from the true size, and the results are sliced back to it.

The fused call therefore compiles at most ``log2(largest) + 2`` times per phase and key
layout. Padding works where the data is:

- numpy arrays and jax arrays on one CPU device are padded and sliced with numpy, which
  compiles nothing. A jax array is read on the host for that, so such a batch waits for
  the array to be computed (only batches of a new, non-power-of-two size do);
- jax arrays on one accelerator are padded and sliced by small jitted functions, which
  compile once per odd size (a pad is far cheaper to compile than the fused call, and
  reading the array on the host would stall the pipeline);
- arrays sharded over several devices keep their exact shape (padding would gather them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

VALIDATION = "validation"
NORMALIZE = "normalize"


def bucket(n: int) -> int:
    """The padded leading size for ``n`` rows: the next power of two (``n`` itself for 0)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def _on_host(x) -> bool:
    """numpy, or a jax array on one CPU device (numpy reads it without a copy)."""
    if isinstance(x, np.ndarray):
        return True
    devices = x.devices()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _single_device(x) -> bool:
    return isinstance(x, np.ndarray) or len(x.devices()) == 1


class Buckets:
    """Chooses, per phase and key, the leading size that a batch runs at."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, str], int] = {}

    def rows(self, phase: str, key: str, n: int) -> int:
        """The leading size a batch of ``n`` rows runs at: ``n``, or ``bucket(n)``.

        The first size seen for ``(phase, key)`` is kept exact (a steady loop never pads).
        """
        first = self._first.setdefault((phase, key), n)
        return n if n == first else bucket(n)

    def pad(self, phase: str, key: str, x, *, sized: bool = False) -> tuple[object, int | None]:
        """``(x or x padded along axis 0, the true leading size when padded, else None)``.

        Args:
          sized: also give the size of a batch that fills its bucket exactly (a power of two
            other than the first size), so that a call taking the size as an argument (the
            validation fold) compiles once per bucket, not once padded and once exact.
        """
        shape = x.shape
        if not shape:
            return x, None
        n = shape[0]
        rows = self.rows(phase, key, n)
        if rows == n or not _single_device(x):
            exact = sized and n != self._first[(phase, key)] and _single_device(x)
            return x, (n if exact else None)
        if _on_host(x):
            host = np.asarray(x)
            padded = np.zeros((rows, *host.shape[1:]), host.dtype)
            padded[:n] = host
            return padded, n
        return _pad_rows(x, rows), n


def unpad(y: jax.Array, n: int, like) -> jax.Array:
    """``y[:n]``, placed like ``like`` (the input it was computed from)."""
    if _on_host(like):
        device = None if isinstance(like, np.ndarray) else next(iter(like.devices()))
        # numpy slices without compiling; this waits for y (only for a padded batch).
        return jax.device_put(np.asarray(y)[:n], device)
    return _slice_rows(y, n)


@functools.partial(jax.jit, static_argnums=1)
def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


@functools.partial(jax.jit, static_argnums=1)
def _slice_rows(y: jax.Array, n: int) -> jax.Array:
    return y[:n]
