"""Scores as ordered integer keys, and labels as the F1 threshold counts them.

The F1 threshold only compares scores, so it works on keys: unsigned integers whose order
is the scores' order. A float32 score's key is its bit pattern with the sign bit flipped
(positive numbers) or every bit flipped (negative numbers), after ``-0.0`` became ``+0.0``.
Every step is an integer operation: XLA:CPU flushes float32 subnormals to zero in float
arithmetic and comparisons (``1e-40 == 0`` is true there), while torch keeps them, so a
float comparison would merge scores that anomalib keeps apart.

Labels follow anomalib 2.7's checks: a value counts as anomalous when it equals 1
(``target == 1`` in torchmetrics' curve, ``1 in target`` for the one-class fallback) and
as normal for the fallback only when it equals 0 (``0 in target``). A 0/255 mask therefore
has no anomalous pixel, and a label of 2 is counted among the false positives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Each key splits into a bin (its high 16 bits) and an offset in the bin (its low 16 bits).
BIN_BITS = 16
N_BINS = 1 << BIN_BITS
LOW_MASK = N_BINS - 1

# Keys of +-inf: the finite keys lie strictly between; NaNs lie beyond.
KEY_NEG_INF = np.uint32(0x007F_FFFF)
KEY_POS_INF = np.uint32(0xFF80_0000)

# A score's code: its label is 0, is 1, is something else (counted as a negative, like 0),
# or it is not counted (masked out, or not finite).
ZERO, POS, OTHER, SKIP = 0, 1, 2, 3
N_CLASSES = 3


def as_float32(scores: jax.Array) -> jax.Array:
    """``scores`` as float32 with every value kept exactly (subnormals included).

    float16 and bfloat16 widen exactly; integers (exact up to 2**24 in magnitude) and, with
    x64, float64 round to the nearest float32.
    """
    dtype = scores.dtype
    if dtype == jnp.float32:
        return scores
    if dtype == jnp.bfloat16:
        # A bit shift: a float conversion could flush bfloat16's subnormals on XLA:CPU.
        bits = lax.bitcast_convert_type(scores, jnp.uint16).astype(jnp.uint32) << 16
        return lax.bitcast_convert_type(bits, jnp.float32)
    return scores.astype(jnp.float32)


def to_key(scores: jax.Array) -> jax.Array:
    """The uint32 order keys of ``scores`` (any real dtype, see ``as_float32``)."""
    bits = lax.bitcast_convert_type(as_float32(scores), jnp.uint32)
    bits = jnp.where(bits == jnp.uint32(0x8000_0000), jnp.uint32(0), bits)  # -0.0 is 0.0
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x8000_0000))


def is_finite_key(key: jax.Array) -> jax.Array:
    return (key > KEY_NEG_INF) & (key < KEY_POS_INF)


def from_key(key: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The score whose key is ``key``, in ``dtype`` (a dtype the key's score fits exactly)."""
    negative = (key >> 31) == 0
    bits = jnp.where(negative, ~key, key & jnp.uint32(0x7FFF_FFFF))
    if dtype == jnp.bfloat16:
        return lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    value = lax.bitcast_convert_type(bits, jnp.float32)
    return value if dtype == jnp.float32 else value.astype(dtype)


def codes(labels: jax.Array, key: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Per value, as uint8: ``ZERO``, ``POS``, ``OTHER`` (by label) or ``SKIP`` (a
    non-finite score, which the caller counts, or a False ``mask`` entry)."""
    if labels.dtype == jnp.bool_:
        cls = labels.astype(jnp.uint8)
    else:
        cls = jnp.where(labels == 1, jnp.uint8(POS), jnp.where(labels == 0, ZERO, OTHER))
        cls = cls.astype(jnp.uint8)
    skip = ~is_finite_key(key)
    if mask is not None:
        skip = skip | ~jnp.broadcast_to(mask, key.shape)
    return jnp.where(skip, jnp.uint8(SKIP), cls)


def is_negative(code: jax.Array) -> jax.Array:
    """Counted, with a label other than 1 (torchmetrics' false positives)."""
    return (code == ZERO) | (code == OTHER)


def chunk_key(stored: jax.Array) -> jax.Array:
    """The keys of a chunk: uint32 arrays are keys already (``f1_adaptive_threshold``'s);
    an exact state stores float scores (integer scores become float32 before), keyed here."""
    return stored if stored.dtype == jnp.uint32 else to_key(stored)
