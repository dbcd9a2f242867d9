"""The bounded F1 state's small-set buffer: every score, while they fit.

Validation sets of image scores hold hundreds or thousands of values: the bounded state
keeps them all (keys and codes, ``K`` entries, 5 bytes each) and is exact for them, as the
exact state is. The first batch that does not fit marks the buffer overflowed for good
(``fill = K + 1``) and the bins and slots (``f1_slots``) take over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnorm._src.f1_keys import SKIP


def empty(size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        jnp.zeros(size, jnp.uint32),
        jnp.full(size, SKIP, jnp.uint8),
        jnp.zeros((), jnp.uint32),
    )


def _overflowed(size: int) -> jax.Array:
    return jnp.uint32(size + 1)


def write(keys, codes, fill, key, code):
    """Appends a batch's keys and codes at ``fill`` (or marks the buffer overflowed)."""
    size = keys.shape[0]
    n = key.size
    if n > size:  # static: a batch larger than the buffer never fits
        return keys, codes, _overflowed(size)
    at = fill + jnp.arange(n, dtype=jnp.uint32)
    at = jnp.where(fill + n <= size, at, size).astype(jnp.int32)  # no partial writes
    keys = keys.at[at].set(key.reshape(-1), mode="drop")
    codes = codes.at[at].set(code.reshape(-1), mode="drop")
    new_fill = jnp.where(fill + n <= size, fill + n, _overflowed(size))
    return keys, codes, new_fill.astype(jnp.uint32)


def merge(a, b):
    """``a``'s entries then ``b``'s, or overflowed when they do not fit together."""
    keys, codes, fill = a
    b_keys, b_codes, b_fill = b
    size = keys.shape[0]
    fits = fill + b_fill <= size
    at = fill + jnp.arange(size, dtype=jnp.uint32)
    at = jnp.where(fits & (jnp.arange(size) < b_fill), at, size).astype(jnp.int32)
    keys = keys.at[at].set(b_keys, mode="drop")
    codes = codes.at[at].set(b_codes, mode="drop")
    return keys, codes, jnp.where(fits, fill + b_fill, _overflowed(size)).astype(jnp.uint32)


def holds_all(fill: int, size: int) -> bool:
    """Whether a buffer of ``size`` entries filled to ``fill`` holds every value (host)."""
    return size > 0 and fill <= size
