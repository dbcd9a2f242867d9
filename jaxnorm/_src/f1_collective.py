"""The F1 threshold across processes, through a ``jaxnorm.Reducer`` (min, max and sum).

Every process holds a state of its own data. Gathering every score (what anomalib's metric
does under DDP) is not needed: the threshold depends on counts only.

1. ``reduce_facts``: one all-reduce of the bin counts (int64 ``65536 x 3``, 1.5 MiB) and
   of the numbers of values, of non-finite values and of processes. Every process now
   knows the global counts, so every process computes the same candidate bins
   (``f1_curve.candidate_bins``). A one-class set (anomalib's fallbacks) needs only the
   smallest or largest score: ``reduce_range``.
2. ``global_best``: exact states all-reduce their exact counts of the candidate bins,
   ``f1_curve.GROUP_BINS`` bins per call, and sweep them: the threshold of the union, as
   one process would find it. Bounded states first all-reduce, per candidate bin, how many
   processes have all its scores in a complete slot or have none of them, and each bin's
   smallest score; the bins where all do are resolved as above, the others are known by
   their counts and smallest scores (``f1_slots``).

Each call is a collective, made the same number of times on every process, in the same
order (the count depends on global counts only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import f1_buffer, f1_curve, f1_slots
from jaxnorm._src.f1_keys import N_BINS, N_CLASSES

_NO_KEY = 0xFFFF_FFFF


class Facts(NamedTuple):
    """What ``compute`` reads from a state (or from all of them)."""

    counts: np.ndarray  # uint32-valued [N_BINS, 3] class counts
    n_values: int
    n_nonfinite: int
    n_whole: int  # states whose small-set buffer holds every value they saw
    n_states: int = 1


def reduce_facts(reducer, facts: Facts) -> Facts:
    """Phase 1: the counts of every process's state together."""
    extra = [facts.n_values, facts.n_nonfinite, facts.n_whole, 1]
    local = np.concatenate([np.asarray(facts.counts, np.int64).reshape(-1), extra])
    total = _sum(reducer, local)
    n_values, n_bad, n_whole, n_states = (int(x) for x in total[-4:])
    counts = total[:-4].reshape(N_BINS, N_CLASSES)
    if counts.max(initial=0) >= 1 << 32:
        raise ValueError(
            "F1AdaptiveThreshold.compute: a bin holds 2**32 or more values across processes; "
            "counts are uint32. Compute thresholds on a sample of the pixels."
        )
    return Facts(counts.astype(np.uint32), n_values, n_bad, n_whole, n_states)


def _to_values(keys: np.ndarray, empty: float) -> np.ndarray:
    """float32 scores of uint32 keys (bit for bit), ``empty`` where a key is ``_NO_KEY``
    (min) or 0 (max), so that the reducer's min and max ignore them."""
    keys = np.asarray(keys, np.uint32)
    bits = np.where(keys >> 31 == 0, ~keys, keys & np.uint32(0x7FFF_FFFF))
    values = bits.astype(np.uint32).view(np.float32).copy()
    values[(keys == _NO_KEY) | (keys == 0)] = empty
    return values


def _to_keys(values: np.ndarray, empty: int) -> np.ndarray:
    values = np.asarray(values, np.float32)
    bits = values.view(np.uint32).copy()
    bits[bits == 0x8000_0000] = 0
    keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x8000_0000)).astype(np.uint32)
    keys[~np.isfinite(values)] = empty
    return keys


def reduce_range(reducer, lo: int, hi: int) -> tuple[int, int]:
    """The smallest and largest counted key over processes (a process without any passes
    ``_NO_KEY`` and 0)."""
    mins, maxs, _ = reducer(
        _to_values([lo], np.inf), _to_values([hi], -np.inf), np.zeros(0, np.int64)
    )
    return int(_to_keys(mins, _NO_KEY)[0]), int(_to_keys(maxs, 0)[0])


def _sum(reducer, local: np.ndarray) -> np.ndarray:
    empty = np.zeros(0, np.float32)
    _, _, total = reducer(empty, empty, np.asarray(local, np.int64).reshape(-1))
    return np.asarray(total, np.int64)


def global_best(reducer, state, facts: Facts):
    """Phase 2: ``(key, f1, lost)`` over every process's data (see the module docstring)."""
    counts = jnp.asarray(neg_pos_host(facts.counts))
    candidates, _, above, n_pos = f1_curve.candidate_bins(counts)
    bins = np.flatnonzero(np.asarray(candidates)).astype(np.int32)

    def summed(local, shape):
        return jnp.asarray(_sum(reducer, np.asarray(local)).reshape(shape).astype(np.uint32))

    whole = facts.n_whole == facts.n_states  # every bounded state kept all its scores
    if state.mode == "exact" or whole:
        chunks = state.chunks if state.mode == "exact" else [(state.buf_keys, state.buf_codes)]

        def fine_of(padded, n_slots):
            local = f1_curve.chunks_fine_counts(chunks, padded, n_slots)
            return summed(local, (n_slots, N_BINS, 2))

        f1, key = f1_curve.best_in_bins(bins, fine_of, above, n_pos)
        return key, f1, 0.0

    slots = (state.slot_bins, state.slot_complete, state.fine)
    # A state whose buffer holds every score it saw supplies any bin from the buffer.
    here = f1_buffer.holds_all(int(state.buf_fill), state.buf_keys.shape[0])
    if here:
        local_ok = np.ones(bins.size, np.int64)
    else:
        local_counts = f1_curve.neg_pos(state.counts)
        local_ok = np.asarray(_covers(local_counts, *slots[:2], jnp.asarray(bins)))
    covered = _sum(reducer, local_ok) == facts.n_states
    local_min = _to_values(np.asarray(state.bin_min), np.inf)
    # Reducers take as many maxs as mins (jax's checks it): -inf, the identity of max.
    mins, _, _ = reducer(local_min, np.full_like(local_min, -np.inf), np.zeros(0, np.int64))
    bin_min = jnp.asarray(_to_keys(mins, _NO_KEY))

    def slot_fine(padded, n_slots):
        if here:
            local = f1_curve.chunks_fine_counts(
                [(state.buf_keys, state.buf_codes)], padded, n_slots
            )
        else:
            local = _slot_fine_of(*slots, padded)
        return summed(local, (n_slots, N_BINS, 2))

    f1, key = f1_curve.best_in_bins(bins[covered], slot_fine, above, n_pos)
    open_bins = np.zeros(N_BINS, bool)
    open_bins[bins[~covered]] = True
    exact_key = jnp.uint32(0) if key is None else key
    return _with_open_bins(counts, jnp.asarray(open_bins), bin_min, jnp.float32(f1), exact_key)


def neg_pos_host(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, np.uint32)
    return np.stack([counts[:, 0] + counts[:, 2], counts[:, 1]], axis=-1)


_covers = jax.jit(f1_slots.covers)
_slot_fine_of = jax.jit(f1_slots.slot_fine_of)
_with_open_bins = jax.jit(f1_slots.with_open_bins)
