r"""The bounded-memory F1 state's refinement: exact counts for a few bins, chosen on the fly.

The bins (``f1_curve``) bound where the best threshold lies, but inside a bin only the
scores themselves tell the thresholds apart. The bounded state keeps ``C`` *slots*, each
the exact count of every distinct key of one bin (``65536 x 2`` counters). After each
batch the free slots go to the bins with the largest F1 bound (``UB``) that are within
``1/32`` of the best edge f1 so far and have no slot. A slot is *complete* when it has
seen every score of its bin: it was given out before any score of that bin arrived (the
bin was empty before the batch that assigned it), and every state merged into it was
complete for that bin too.

``result`` then sweeps the complete slots of the candidate bins exactly, as the exact
state does. Candidate bins without a complete slot are known only by their counts and
extremes: the f1 at a bin's smallest score (kept per bin, ``fold_extremes``) is known
exactly, and a score inside the bin could reach at most ``UB``. The answer is the best of
both, and ``max(UB) - f1`` over those bins bounds the F1 lost (0: the answer is
anomalib's). Per bin, ``UB`` minus the f1 at its smallest score is at most
``n_neg / (2 P)`` (the bin's negatives over twice the positives: ``UB - edge =
2 T n / ((P + T + F)(P + T + F + n)) <= 2 T n / (P + T)**2 <= n / (2 P)``), so the loss
never exceeds ``max_b n_neg[b] / (2 P)``, even with no slot at all.

With stationary data the first batch already ranks the bins near the optimum, so a
complete slot covers each candidate and the answer is exact; the tests measure how often.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import f1_curve
from jaxnorm._src.f1_keys import N_BINS, SKIP

# A slot may go to a bin whose bound is within this fraction of the best edge f1 so far.
ASSIGN_SLACK = np.float32(1 - 2**-5)


def _bin_totals(counts: jax.Array, bins: jax.Array) -> jax.Array:
    """How many scores ``counts`` holds in each of ``bins`` (``-1`` pads give 0)."""
    return jnp.where(bins >= 0, jnp.sum(counts[jnp.maximum(bins, 0)], axis=-1), 0)


def _only_true(match: jax.Array) -> jax.Array:
    """Per row of ``match`` (at most one True each), the column of its True (0 if none).

    A sum, not ``argmax``: jax < 0.7 rejects argmax's two-operand reduce inside
    ``shard_map`` when the mask varies over devices and the index does not.
    """
    columns = jnp.arange(match.shape[1], dtype=jnp.int32)
    return jnp.sum(jnp.where(match, columns, 0), axis=1)


def _has_slot(bins: jax.Array, complete: jax.Array | None = None) -> jax.Array:
    mark = bins >= 0 if complete is None else (bins >= 0) & complete
    safe = jnp.where(mark, bins, N_BINS)
    return jnp.zeros(N_BINS, bool).at[safe].set(True, mode="drop")


def _fill(bins, complete, fine, new_bins, new_complete, new_fine, take):
    """Free slots, in order, take the entries of ``new_*`` where ``take`` (in order)."""
    free = bins < 0
    free_rank = jnp.cumsum(free) - 1
    take_rank = jnp.where(take, jnp.cumsum(take) - 1, -1)
    # For each free slot, the index of the taken entry with the same rank (or none).
    match = free[:, None] & (free_rank[:, None] == take_rank[None, :])
    got = jnp.any(match, axis=1)
    src = _only_true(match)
    bins = jnp.where(got, new_bins[src], bins)
    complete = jnp.where(got, new_complete[src], complete)
    if new_fine is not None:
        fine = jnp.where(got[:, None, None], new_fine[src], fine)
    return bins, complete, fine


def choose(bins: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gives free slots to the promising bins without one (see the module docstring).

    Returns:
      ``(bins, new)``: the slots' bins, and which slots were given out here.
    """
    n_slots = bins.shape[0]
    above, upto = f1_curve.bin_bounds(counts)
    n_pos = upto[0, 1]
    nonempty = (counts[:, 0] + counts[:, 1]) > 0
    edge = jnp.where(nonempty, f1_curve.f1_float32(upto[:, 1], upto[:, 0], n_pos), -1.0)
    bound = f1_curve.upper_bound(above, upto, n_pos)
    eligible = nonempty & ~_has_slot(bins) & (n_pos > 0) & (bound >= jnp.max(edge) * ASSIGN_SLACK)
    top, top_bins = lax.top_k(jnp.where(eligible, bound, -1.0), n_slots)
    free = bins < 0
    unused = jnp.zeros(n_slots, bool)
    new_bins, _, _ = _fill(bins, free, None, top_bins.astype(jnp.int32), unused, None, top >= 0)
    return new_bins, free & (new_bins >= 0)


def fold(slots, counts_before, counts_after, key, code, replay, buffer):
    """Folds a batch into the slots: free ones go to promising bins first.

    A slot given out now is complete when its bin held nothing before this batch, or when
    ``replay`` (the buffer held every earlier score): the buffer's scores are counted in.
    """
    bins, complete, fine = slots
    bins, new = choose(bins, counts_after)
    fresh = replay | (_bin_totals(counts_before, bins) == 0)
    complete = jnp.where(new, fresh, complete)
    fine = f1_curve.fine_counts(key, code, bins, fine)
    if buffer[0].shape[0]:
        earlier = f1_curve.fine_counts(buffer[0], buffer[1], bins)
        fine = fine + jnp.where(replay, earlier, jnp.zeros_like(earlier))
    return bins, complete, fine


def merge(a, b, counts):
    """The slots of two states merged; ``a, b`` are ``(bins, complete, fine, counts, whole,
    buffer keys, buffer codes)``, ``counts`` their sum.

    The merged slots hold ``a``'s bins, then ``b``'s other bins, then promising ones while
    slots are free. Each side supplies a slot's counts: from its matching slot (complete
    if that was), from its buffer when it holds every score it saw (complete), or nothing
    (complete if it saw no score of that bin). A slot is complete when both sides are.
    """
    bins = a[0]
    rest = (b[0] >= 0) & ~jnp.any(b[0][:, None] == bins[None, :], axis=1)
    none = jnp.zeros(bins.shape, bool)
    bins, _, _ = _fill(bins, none, None, b[0], none, None, rest)
    bins, _ = choose(bins, counts)
    fine_a, complete_a = _side(bins, *a)
    fine_b, complete_b = _side(bins, *b)
    return bins, complete_a & complete_b, fine_a + fine_b


def _side(bins, s_bins, s_complete, s_fine, s_counts, whole, keys, codes):
    match = (bins[:, None] == s_bins[None, :]) & (bins[:, None] >= 0)
    has = jnp.any(match, axis=1)
    j = _only_true(match)
    fine = jnp.where(has[:, None, None], s_fine[j], 0).astype(s_fine.dtype)
    complete = jnp.where(has, s_complete[j], _bin_totals(s_counts, bins) == 0)
    if keys.shape[0]:
        replayed = f1_curve.fine_counts(keys, codes, bins)
        fine = jnp.where(whole, replayed, fine)
        complete = complete | whole
    return fine, complete


def fold_extremes(bin_min, bin_max, key, code):
    """Per bin, the smallest and largest key seen (a bin's smallest score is a threshold
    whose f1 its counts give exactly)."""
    index = jnp.where(code != SKIP, (key >> 16).astype(jnp.int32), N_BINS).reshape(-1)
    flat = key.reshape(-1)
    bin_min = bin_min.at[index].min(flat, mode="drop")
    bin_max = bin_max.at[index].max(flat, mode="drop")
    return bin_min, bin_max


def result(counts, bins, complete, fine, bin_min):
    """``(key, f1, lost)``: the bounded state's threshold key, its float32 f1, and the most
    float32 f1 it can have lost against anomalib's (0 when it is anomalib's). Jittable."""
    candidates, _, above, n_pos = f1_curve.candidate_bins(counts)
    usable = (bins >= 0) & complete & candidates[jnp.maximum(bins, 0)]
    order = jnp.argsort(jnp.where(usable, bins, N_BINS))
    slot_bins = jnp.where(usable, bins, -1)[order]
    slot_fine = jnp.where(usable[:, None, None], fine, 0)[order]
    exact_f1, exact_key = f1_curve.sweep(slot_fine, slot_bins, above, n_pos)
    open_bins = candidates & ~_has_slot(bins, complete)
    return with_open_bins(counts, open_bins, bin_min, exact_f1, exact_key)


def with_open_bins(counts, open_bins, bin_min, exact_f1, exact_key):
    """The best of ``(exact_f1, exact_key)`` (resolved bins; ``-1`` when none) and the
    smallest scores (``bin_min``) of ``open_bins``, whose f1 the counts give:
    ``(key, f1, lost)`` (see the module docstring)."""
    above, upto = f1_curve.bin_bounds(counts)
    n_pos = upto[0, 1]
    edge = f1_curve.f1_float32(upto[:, 1], upto[:, 0], n_pos)
    edge = jnp.where(open_bins, edge, -1.0)
    at = jnp.argmax(edge)  # the first, so the smallest threshold among equals
    edge_key = bin_min[at]
    take_edge = (edge[at] > exact_f1) | ((edge[at] == exact_f1) & (edge_key < exact_key))
    f1 = jnp.where(take_edge, edge[at], exact_f1)
    key = jnp.where(take_edge, edge_key, exact_key)
    reach = jnp.max(jnp.where(open_bins, f1_curve.upper_bound(above, upto, n_pos), 0.0))
    lost = jnp.maximum(reach * f1_curve.UB_MARGIN - f1, 0.0)
    return key, f1, jnp.where(jnp.any(open_bins), lost, 0.0)


def covers(counts, bins, complete, wanted):
    """Per bin of ``wanted``: this state has all its scores in a complete slot, or none."""
    return _has_slot(bins, complete)[wanted] | (jnp.sum(counts[wanted], axis=-1) == 0)


def slot_fine_of(bins, complete, fine, wanted):
    """``[len(wanted), 65536, 2]``: the complete slots' counts of ``wanted`` (else 0)."""
    hit = (bins[None, :] == wanted[:, None]) & complete[None, :] & (wanted[:, None] >= 0)
    j = _only_true(hit)
    return jnp.where(jnp.any(hit, axis=1)[:, None, None], fine[j], 0).astype(fine.dtype)
