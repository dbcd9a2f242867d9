"""The F1 state's arrays, folded: one batch in (``fold``), two states together
(``merge_fixed``), one jitted call each, pure.

A state's arrays travel as one tuple, in the order of ``F1AdaptiveThreshold._fixed``:
counts, value count, non-finite count, per-bin extremes, slots (bins, complete, fine) and
the small-set buffer (keys, codes, fill). Exact states have no extremes, slots or buffer
(zero-size arrays), so the same code serves both modes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import f1_buffer, f1_curve, f1_slots
from jaxnorm._src.f1_curve import neg_pos
from jaxnorm._src.f1_inputs import prepare
from jaxnorm._src.f1_keys import N_BINS, N_CLASSES, as_float32

NO_KEY = 0xFFFF_FFFF  # above every score's key: an empty bin's minimum
_HALF = (jnp.float16, jnp.bfloat16)


@functools.cache
def empty_fields(n_slots: int, buffer: int) -> tuple:
    # Immutable arrays, shared by every empty state; made lazily and concretely (see
    # MinMax's empty_fields).
    with jax.ensure_compile_time_eval():
        return (
            jnp.zeros((N_BINS, N_CLASSES), jnp.uint32),
            jnp.zeros(2, jnp.uint32),
            jnp.zeros((), jnp.uint32),
            jnp.full(N_BINS if n_slots else 0, NO_KEY, jnp.uint32),
            jnp.zeros(N_BINS if n_slots else 0, jnp.uint32),
            jnp.full(n_slots, -1, jnp.int32),
            jnp.zeros(n_slots, bool),
            jnp.zeros((n_slots, N_BINS, 2), jnp.uint32),
            *f1_buffer.empty(buffer),
        )


@functools.partial(jax.jit, static_argnames=("keep", "axis_name"))
def fold(fixed, scores, labels, mask, keep, axis_name):
    counts, n_values, n_bad_all, bin_min, bin_max, bins, complete, fine, *buf = fixed
    key, code = prepare(scores, labels, mask)
    batch, n_bad = f1_curve.bin_counts(key, code, mask)
    new_counts = counts + batch
    if bins.shape[0]:
        bin_min, bin_max = f1_slots.fold_extremes(bin_min, bin_max, key, code)
        size = buf[0].shape[0]
        earlier = buf
        if size:
            buf = f1_buffer.write(*buf, key, code)
        whole_before = _whole(earlier[2], size, axis_name)
        whole_after = _whole(buf[2], size, axis_name)
        before, after = counts, new_counts
        if axis_name is not None:  # every device decides on the global counts
            before = lax.psum(counts, axis_name)
            after = before + lax.psum(batch, axis_name)

        def step(slots):
            return f1_slots.fold(
                slots, neg_pos(before), neg_pos(after), key, code, whole_before, earlier[:2]
            )

        slots = (bins, complete, fine)
        # Slots wait while the buffer holds every score (then the buffer is replayed into
        # them): a batch larger than the buffer never fits, so it needs no test.
        slots = step(slots) if not size or key.size > size else _unless(whole_after, step, slots)
        bins, complete, fine = slots
    fixed = (
        new_counts,
        _add_count(n_values, jnp.sum(batch, dtype=jnp.uint32)),
        n_bad_all + n_bad,
        bin_min,
        bin_max,
        bins,
        complete,
        fine,
        *buf,
    )
    if not keep:
        return fixed, None, None
    # The scores themselves, in a buffer of their own (never an alias of the caller's, which
    # DLPack may share with a tensor that changes later): a float copy of the batch, as
    # cheap to write as the keys and no more bytes than anomalib keeps.
    stored = jnp.copy(as_float32(scores)) if scores.dtype not in _HALF else jnp.copy(scores)
    return fixed, stored, code


def bucket(n: int) -> int:
    """A power of two >= ``n`` (at least 1024): the sizes a sort compiles for."""
    return max(1024, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=2)
def head(keys, codes, n: int):
    return keys[:n], codes[:n]


def _whole(fill, size: int, axis_name):
    """Whether a buffer of ``size`` filled to ``fill`` holds every score (on every device)."""
    if not size:
        return jnp.zeros((), bool)
    whole = fill <= size
    if axis_name is not None:
        whole = lax.pmin(whole.astype(jnp.uint8), axis_name) > 0
    return whole


def _unless(skip, fn, operand):
    """``operand`` where ``skip``, else ``fn(operand)``. CPU branches and skips the work;
    accelerators compute both and select, since a conditional there reads its predicate
    back to the host (XLA:GPU), which would stall every batch."""

    def branch(x):
        return lax.cond(skip, lambda y: y, fn, x)

    def select(x):
        return jax.tree.map(lambda a, b: jnp.where(skip, a, b), x, fn(x))

    return lax.platform_dependent(operand, cpu=branch, default=select)


def same_everywhere(x, axis_name):
    if x.dtype == jnp.bool_:
        return lax.pmax(x.astype(jnp.uint8), axis_name).astype(bool)
    return lax.pmax(x, axis_name)


def _add_count(words, n):
    low = words[0] + n
    return jnp.stack([low, words[1] + (low < words[0]).astype(jnp.uint32)])


@jax.jit
def merge_fixed(a, b):
    counts, nv, nb, bmin, bmax, bins, complete, fine, *buf = a
    b_counts, b_nv, b_nb, b_bmin, b_bmax, b_bins, b_complete, b_fine, *b_buf = b
    total = _add_count(nv, b_nv[0])
    total = jnp.stack([total[0], total[1] + b_nv[1]])
    if bins.shape[0]:
        size = buf[0].shape[0]
        a = (bins, complete, fine, neg_pos(counts), _whole(buf[2], size, None), *buf[:2])
        b = (b_bins, b_complete, b_fine, neg_pos(b_counts), _whole(b_buf[2], size, None))
        merged = f1_slots.merge(a, (*b, *b_buf[:2]), neg_pos(counts + b_counts))
        if size:
            buf = f1_buffer.merge(buf, b_buf)
        # A buffer that still holds every score needs no slots (they wait, as in _fold).
        whole = _whole(buf[2], size, None)
        empty = (jnp.full_like(bins, -1), jnp.zeros_like(complete), jnp.zeros_like(fine))
        bins, complete, fine = jax.tree.map(lambda e, m: jnp.where(whole, e, m), empty, merged)
    return (
        counts + b_counts,
        total,
        nb + b_nb,
        jnp.minimum(bmin, b_bmin),
        jnp.maximum(bmax, b_bmax),
        bins,
        complete,
        fine,
        *buf,
    )


@jax.jit
def local_range(counts, bin_min, bin_max):
    """The smallest and largest counted key, from a bounded state's per-bin extremes."""
    nonempty = jnp.sum(counts, axis=1) > 0
    lo = jnp.min(jnp.where(nonempty, bin_min, jnp.uint32(NO_KEY)))
    hi = jnp.max(jnp.where(nonempty, bin_max, jnp.uint32(0)))
    return lo, hi
