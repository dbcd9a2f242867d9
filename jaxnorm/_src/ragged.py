"""Ragged ``box_scores``: one padded array per batch, with lengths bucketed.

``jit`` compiles once per input shape, and per-image box counts change every batch. The
scores of a batch are concatenated on the host (they are small), padded to the next power of
two and normalized or folded in one call, so the number of compilations grows with
log2(largest batch), not with the number of batches. Splitting back happens on the host too:
slicing on device would compile once per slice length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from jaxnorm._src import validation
from jaxnorm._src.normalize import output_dtype

MIN_BUCKET = 64


def bucket(n: int) -> int:
    """The padded length for ``n`` values: a power of two, at least ``MIN_BUCKET``."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def check_boxes(key: str, boxes) -> list:
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(
            f"{key}: expected a list with one 1-D array of scores per image, got "
            f"{type(boxes).__name__}; wrap per-image arrays in a list."
        )
    for i, b in enumerate(boxes):
        arr = validation.as_array(f"{key}[{i}]", b)
        if arr.ndim > 1:
            raise ValueError(
                f"{key}[{i}]: expected a 1-D array of box scores, got shape {tuple(arr.shape)}."
            )
    return list(boxes)


def concat_padded(boxes: Sequence) -> tuple[np.ndarray, list[int]]:
    """Concatenates 1-D arrays on the host and zero-pads to ``bucket(total)``.

    Returns:
      ``(padded, lengths)``; the valid entries are ``padded[:sum(lengths)]``.
    """
    on_host = all(
        not isinstance(b, jax.Array) or all(d.platform == "cpu" for d in b.devices()) for b in boxes
    )
    # np.asarray of a CPU array is a view; jax.device_get batches accelerator transfers.
    host = [np.asarray(b).reshape(-1) for b in (boxes if on_host else jax.device_get(list(boxes)))]
    lengths = [h.size for h in host]
    try:
        dtype = np.result_type(*host) if host else np.float32
    except TypeError:  # numpy has no common type for some pairs (bfloat16 and float16)
        dtype = np.dtype(np.float32)
    padded = np.zeros(bucket(sum(lengths)), dtype)
    if host:
        np.concatenate(host, out=padded[: sum(lengths)])
    return validation.host_ints_ok(padded), lengths


def split_host(
    padded: jax.Array, lengths: Sequence[int], like: Sequence | None = None
) -> list[np.ndarray]:
    """Splits ``padded[:sum(lengths)]`` into per-image, writable numpy arrays.

    With ``like`` (the boxes they were computed from), each piece takes the dtype and shape
    that ``normalize`` gives its box (boxes of mixed dtypes are normalized in their common
    dtype).
    """
    # np.array copies once (a small array): the pieces are writable, unlike views of a
    # jax array's read-only host buffer, so torch can wrap them without a copy each.
    host = np.array(padded)[: sum(lengths)]
    pieces = np.split(host, np.cumsum(lengths)[:-1]) if lengths else []
    if like is not None:
        # Each piece as ``normalize`` returns its box: in its dtype, and 0-d for a 0-d box.
        for i, b in enumerate(like):
            dtype = _box_dtype(b.dtype if hasattr(b, "dtype") else np.asarray(b).dtype)
            if pieces[i].dtype != dtype:
                pieces[i] = pieces[i].astype(dtype)
            if np.ndim(b) == 0:
                pieces[i] = pieces[i].reshape(())
    return pieces


@functools.lru_cache(maxsize=64)
def _box_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype ``normalize`` returns for a box of ``dtype`` (as jax holds it: native, and
    float64 is float32 when x64 is off)."""
    native = dtype.newbyteorder("=")  # jax holds native byte order only (see as_array)
    return output_dtype(np.dtype(jax.dtypes.canonicalize_dtype(native)))


def split(padded: jax.Array, lengths: Sequence[int], like: Sequence) -> list[jax.Array]:
    """Splits ``padded[:sum(lengths)]`` back into per-image arrays on ``like``'s devices,
    each with the dtype ``normalize`` gives its box."""
    pieces = split_host(padded, lengths, like)
    devices = {next(iter(b.devices())) for b in like if isinstance(b, jax.Array)}
    if len(devices) <= 1:  # the usual case: one transfer call for the whole list
        return jax.device_put(pieces, next(iter(devices), None))
    per_image = [next(iter(b.devices())) if isinstance(b, jax.Array) else None for b in like]
    return [jax.device_put(p, d) for p, d in zip(pieces, per_image, strict=True)]
