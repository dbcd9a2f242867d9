r"""The best-F1 threshold from counts, exactly as anomalib 2.7 picks it, without a full sort.

anomalib's ``F1AdaptiveThreshold`` (torchmetrics' non-binned precision-recall curve) sweeps
every distinct score ``t`` in ascending order, counts ``tp(t)`` (label 1, score >= t) and
``fp(t)`` (other labels, score >= t), and computes in float32

    p = tp / (tp + fp),   r = tp / P,   f1 = 2 p r / (p + r + 1e-10)

(counts rounded to float32 first, ``fp`` as ``n - tp`` in float32, NaN read as 0), then
returns the **first** ``t`` with the largest ``f1``. ``f1_float32`` is that formula,
operation for operation.

Sorting every score is what makes it slow (XLA:CPU's sort is ~20x slower than numpy's), and
only a few scores can win. Here the keys (``f1_keys``) are split by their high 16 bits
into 65536 bins and counted (``bin_counts``: one scatter-add). For a threshold ``t`` in bin
``b`` the counts are bounded by the bin's totals: ``tp(t) <= T_lo[b]`` (positives in bins
``>= b``) and ``fp(t) >= F_hi[b]`` (negatives in bins ``> b``). Exact F1 equals
``2 tp / (P + tp + fp)``, which grows with ``tp`` and falls with ``fp``, so

    F1(t) <= UB[b] = 2 T_lo[b] / (P + T_lo[b] + F_hi[b]).

The smallest score of each non-empty bin is a real threshold whose counts are known
(``T_lo, F_lo``), so ``L``, the largest float32 f1 among them, is reached by some score.
float32 rounding moves f1 by less than 16 units in the last place (2**-24 each): the
counts' conversions (``tp + fp`` is recovered from ``n - tp`` to within 3 units, as
``n - tp <= n``), two divisions, a product, a sum and a division, each rounded once, and
adding ``1e-10`` only lowers it. A score that can reach ``L`` in float32 therefore lies in a
bin with ``UB[b] >= L (1 - 16 * 2**-24)``; ``candidate_bins`` keeps every bin with
``UB (1 + 2**-16) >= L``, a margin 16 times wider than needed (it covers the float32
rounding of ``UB`` itself too). Every score whose float32 f1 equals the maximum is thus in
a candidate bin, and so is the first of them.

The exact work is then done only inside the candidate bins (``fine_counts``: a second
scatter-add over the low 16 bits, which resolves every distinct float32 value) and
``sweep`` evaluates ``f1_float32`` at each distinct value there, in ascending order. When
the candidate bins hold few scores (at most ``EXTRACT_MAX``), or more than
``MAX_CANDIDATE_BINS`` bins qualify (an F1 curve flat over a wide range, such as a best
threshold at the lowest score, where the sparse bins of the smallest scores all qualify),
one pass copies the scores of the candidate bins out of the data (``extract_candidates``)
and ``sparse_sweep`` sorts only those: the counts above each bin come from the bin counts,
so the answer is the same. Small inputs are sorted whole (``sort_sweep``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src.f1_keys import LOW_MASK, N_BINS, N_CLASSES, POS, SKIP, chunk_key, is_negative

# A margin far above float32's rounding of f1 (see the module docstring).
UB_MARGIN = np.float32(1 + 2**-16)
# Candidate bins resolved per pass over the scores; more bins, more passes.
GROUP_BINS = 16
# Beyond this many candidate bins, copying their scores out and sorting them beats the passes.
MAX_CANDIDATE_BINS = 256
# At or below this many values, one sort beats 65536-bin histograms.
SORT_BELOW = 1 << 15
# Candidate bins holding at most this many scores are resolved by copying those scores out
# (one pass) and sorting them, rather than by one pass per group of bins.
EXTRACT_MAX = 1 << 16


def f1_float32(tp: jax.Array, fp: jax.Array, n_pos: jax.Array) -> jax.Array:
    """anomalib 2.7's f1 at counts ``tp, fp`` (unsigned ints), in float32, NaN as 0.

    Every operation rounds as torchmetrics' does, so the result is the same float32.
    """
    # torchmetrics holds tps as a float32 cumulative sum (each count exact, then rounded)
    # and takes fps = (1 + index) - tps in float32: beyond 2**24 values these roundings
    # show, so they are made here in the same order.
    tpf = tp.astype(jnp.float32)
    fpf = (tp + fp).astype(jnp.float32) - tpf
    precision = tpf / (tpf + fpf)
    # XLA rewrites a division by a broadcast scalar as a product with its reciprocal, which
    # rounds differently (recall 5/6 comes out one ulp high, and decides some thresholds);
    # the barrier keeps it a true division, as torch's float32 one is.
    total = lax.optimization_barrier(jnp.broadcast_to(n_pos.astype(jnp.float32), tpf.shape))
    recall = tpf / total
    f1 = (2 * precision * recall) / (precision + recall + jnp.float32(1e-10))
    return jnp.where(jnp.isnan(f1), jnp.float32(0), f1)


def bin_counts(key: jax.Array, code: jax.Array, mask: jax.Array | None) -> tuple:
    """One scatter-add: per bin, how many scores have each label class, and how many
    unmasked scores are not finite.

    Returns:
      ``(counts, n_nonfinite)``: uint32 ``[N_BINS, 3]`` (label 0, label 1, other label;
      see ``f1_keys``) and a uint32 scalar.
    """
    bad = 3 * N_BINS  # the non-finite scores' counter, after the bins
    counted = code != SKIP
    valid = jnp.ones(key.shape, bool) if mask is None else jnp.broadcast_to(mask, key.shape)
    index = (key >> 16).astype(jnp.int32) * N_CLASSES + code.astype(jnp.int32)
    index = jnp.where(counted, index, jnp.where(valid, bad, bad + 1)).reshape(-1)
    # An array of ones and mode="drop" (bad + 1 is dropped): XLA:CPU runs this form of
    # scatter-add ~10-40x faster than one with a scalar update (jax 0.10).
    ones = jnp.ones(index.shape, jnp.uint32)
    counts = jnp.zeros(bad + 1, jnp.uint32).at[index].add(ones, mode="drop")
    return counts[:bad].reshape(N_BINS, N_CLASSES), counts[bad]


def neg_pos(counts: jax.Array) -> jax.Array:
    """``[N_BINS, 2]`` (negatives, positives) from ``[N_BINS, 3]`` class counts."""
    return jnp.stack([counts[:, 0] + counts[:, 2], counts[:, 1]], axis=-1)


def _reverse_cumsum(x: jax.Array, axis: int) -> jax.Array:
    # lax.cumsum compiles ~3x faster than lax.associative_scan here, and runs as fast.
    return lax.cumsum(x, axis=axis, reverse=True)


def bin_bounds(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(above, upto)``: per bin, the (neg, pos) counts in bins above it, and from it up."""
    upto = _reverse_cumsum(counts, axis=0)
    return upto - counts, upto


@jax.jit
def candidate_bins(counts: jax.Array):
    """The bins where the best threshold can lie.

    Args:
      counts: ``[N_BINS, 2]`` (neg, pos) counts with at least one positive.

    Returns:
      ``(candidates, edge_best, above, n_pos)``: a bool mask over bins (see the module
      docstring); ``L``, the largest float32 f1 at the smallest score of a non-empty bin;
      the (neg, pos) counts above each bin; the number of positives.
    """
    above, upto = bin_bounds(counts)
    n_pos = upto[0, 1]
    nonempty = (counts[:, 0] + counts[:, 1]) > 0
    edge = jnp.where(nonempty, f1_float32(upto[:, 1], upto[:, 0], n_pos), -1.0)
    best = jnp.max(edge)
    bound = upper_bound(above, upto, n_pos)
    return nonempty & (bound * UB_MARGIN >= best), best, above, n_pos


def upper_bound(above: jax.Array, upto: jax.Array, n_pos: jax.Array) -> jax.Array:
    """float32 ``UB[b] = 2 T_lo / (P + T_lo + F_hi)``: no threshold in bin ``b`` has a
    larger exact F1 (see the module docstring)."""
    t_lo = upto[:, 1].astype(jnp.float32)
    return 2 * t_lo / (n_pos.astype(jnp.float32) + t_lo + above[:, 0].astype(jnp.float32))


def slot_of(key: jax.Array, bins: jax.Array) -> jax.Array:
    """int32: the index of each key's bin in ``bins`` (``-1`` pads), or ``-1``."""
    safe = jnp.where(bins >= 0, bins, N_BINS)
    slots = jnp.arange(bins.shape[0], dtype=jnp.int32)
    table = jnp.full(N_BINS, -1, jnp.int32).at[safe].set(slots, mode="drop")
    return table[(key >> 16).astype(jnp.int32)]


def fine_counts(
    key: jax.Array, code: jax.Array, bins: jax.Array, into: jax.Array | None = None
) -> jax.Array:
    """uint32 ``[len(bins), 65536, 2]``: the (neg, pos) count of each distinct key in
    ``bins`` (int32, ``-1`` pads), added to ``into`` when given (one buffer for all)."""
    n_slots = bins.shape[0]
    slot = slot_of(key, bins)
    index = (slot * N_BINS + (key & LOW_MASK).astype(jnp.int32)) * 2 + (code == POS).astype(
        jnp.int32
    )
    index = jnp.where((slot < 0) | (code == SKIP), 2 * N_BINS * n_slots, index).reshape(-1)
    ones = jnp.ones(index.shape, jnp.uint32)
    fine = jnp.zeros(2 * N_BINS * n_slots, jnp.uint32) if into is None else into.reshape(-1)
    fine = fine.at[index].add(ones, mode="drop")
    return fine.reshape(n_slots, N_BINS, 2)


def sweep(
    fine: jax.Array, bins: jax.Array, above: jax.Array, n_pos: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The first best f1 over the distinct keys counted in ``fine``, and its key.

    Args:
      fine: ``[n_slots, 65536, 2]`` counts of the bins ``bins`` (ascending; ``-1`` pads,
        with zero counts).
      bins: int32 ``[n_slots]``.
      above: ``[N_BINS, 2]`` (neg, pos) counts above each bin.
      n_pos: the number of positives.

    Returns:
      ``(f1, key)``: float32 (``-1`` when ``fine`` is empty) and uint32.
    """
    base = above[jnp.maximum(bins, 0)]  # [n_slots, 2]
    upto = _reverse_cumsum(fine, axis=1) + base[:, None, :]
    f1 = f1_float32(upto[..., 1], upto[..., 0], n_pos)
    f1 = jnp.where(fine[..., 0] + fine[..., 1] > 0, f1, -1.0).reshape(-1)
    at = jnp.argmax(f1)  # the first maximum: slots ascend, and keys within each
    key = (jnp.maximum(bins, 0)[at // N_BINS].astype(jnp.uint32) << 16) | (at % N_BINS).astype(
        jnp.uint32
    )
    return f1[at], key


def best_in_bins(bins: np.ndarray, fine_of, above, n_pos) -> tuple[float, jax.Array | None]:
    """The first best ``(f1, key)`` over every distinct key of ``bins`` (ascending).

    Args:
      bins: int32 bins to resolve, ascending.
      fine_of: ``fine_of(padded_bins, n_slots)`` returns the ``[n_slots, 65536, 2]`` counts
        of those bins (``-1`` pads count nothing); called once per group of up to
        ``GROUP_BINS`` bins, in order.
      above, n_pos: from ``candidate_bins``.

    Returns:
      ``(-inf, None)`` when ``bins`` hold no key.
    """
    best_f1, best_key = -np.inf, None
    for start in range(0, bins.size, GROUP_BINS):
        group = bins[start : start + GROUP_BINS]
        n_slots = min(GROUP_BINS, 4) if group.size <= 4 else GROUP_BINS  # two compiled sizes
        padded = np.full(n_slots, -1, np.int32)
        padded[: group.size] = group
        padded = jnp.asarray(padded)
        f1, key = sweep_jit(fine_of(padded, n_slots), padded, above, n_pos)
        f1 = float(f1)
        if f1 >= 0 and f1 > best_f1:  # groups ascend: a later one wins only when better
            best_f1, best_key = f1, key
    return best_f1, best_key


def best_threshold_key(counts: jax.Array, chunks: list[tuple[jax.Array, jax.Array]]):
    """``(f1, key)`` of anomalib's threshold, from the bin counts and every stored chunk.

    Reads the candidate bins back to the host (this runs once, at ``compute``). Needs at
    least one positive in ``counts``.
    """
    candidates, _, above, n_pos = candidate_bins(counts)
    bins = np.flatnonzero(np.asarray(candidates)).astype(np.int32)
    n_in = int(_count_in(counts, candidates))
    if n_in <= EXTRACT_MAX or bins.size > MAX_CANDIDATE_BINS:
        keys, codes = extract_candidates(chunks, candidates, n_in)
        return sparse_sweep(keys, codes, above + counts, n_pos)

    def fine_of(padded, n_slots):
        return chunks_fine_counts(chunks, padded, n_slots)

    return best_in_bins(bins, fine_of, above, n_pos)


sweep_jit = jax.jit(sweep)


def chunks_fine_counts(chunks, bins: jax.Array, n_slots: int) -> jax.Array:
    """``fine_counts`` of ``bins`` summed over stored chunks (see ``chunk_key``): one
    dispatch per chunk, so that it compiles once per batch shape, whatever their number."""
    fine = _zero_fine(n_slots)
    for stored, code in chunks:
        fine = _fine_add(fine, stored, code, bins)
    return fine


@functools.partial(jax.jit, static_argnums=0)
def _zero_fine(n_slots: int) -> jax.Array:
    return jnp.zeros((n_slots, N_BINS, 2), jnp.uint32)


@jax.jit
def _fine_add(fine, stored, code, bins):
    return fine_counts(chunk_key(stored), code, bins, fine)


def padded_keys(chunks) -> tuple[jax.Array, jax.Array]:
    """Every chunk's keys and codes in one pair of arrays, padded with skipped entries to a
    power of two (so that sorting them compiles once per size class, not per epoch)."""
    keys = [np.ravel(np.asarray(chunk_key(s))) for s, _ in chunks]
    codes = [np.ravel(np.asarray(c)) for _, c in chunks]
    n = sum(k.size for k in keys)
    size = max(1024, 1 << max(0, n - 1).bit_length())
    key = np.zeros(size, np.uint32)
    code = np.full(size, SKIP, np.uint8)
    if n:
        key[:n] = np.concatenate(keys)
        code[:n] = np.concatenate(codes)
    return jax.device_put(key), jax.device_put(code)


@jax.jit
def sort_sweep(key: jax.Array, code: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(f1, key)`` of anomalib's threshold by sorting every key (needs a positive)."""
    key, code = jnp.ravel(key), jnp.ravel(code)
    # Skipped entries sort first, below every finite key, and count for nothing.
    key = jnp.where(code == SKIP, jnp.uint32(0), key)
    key, code = lax.sort((key, code), num_keys=1)
    pos = (code == POS).astype(jnp.uint32)
    neg = is_negative(code).astype(jnp.uint32)
    # Counts at or above each key: totals minus what lies strictly below its first copy.
    tp = jnp.sum(pos) - (jnp.cumsum(pos) - pos)
    fp = jnp.sum(neg) - (jnp.cumsum(neg) - neg)
    first = jnp.concatenate([jnp.ones(1, bool), key[1:] != key[:-1]]) & (code != SKIP)
    f1 = jnp.where(first, f1_float32(tp, fp, jnp.sum(pos)), -1.0)
    at = jnp.argmax(f1)  # ascending keys: the first maximum is the smallest threshold
    return f1[at], key[at]


@jax.jit
def _count_in(counts: jax.Array, candidates: jax.Array) -> jax.Array:
    """How many scores the candidate bins hold."""
    return jnp.sum(jnp.where(candidates, counts[:, 0] + counts[:, 1], jnp.uint32(0)))


def extract_candidates(chunks, candidates: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The keys and codes of every counted score in the ``candidates`` bins, copied out of
    the chunks into one pair of arrays (``n`` of them, padded with skipped entries to a
    power of two, so that it compiles once per size class): one dispatch per chunk."""
    size = max(1024, 1 << max(0, n - 1).bit_length())
    keys = jnp.zeros(size, jnp.uint32)
    codes = jnp.full(size, SKIP, jnp.uint8)
    fill = jnp.zeros((), jnp.int32)
    for stored, code in chunks:
        keys, codes, fill = _extract_into(keys, codes, fill, stored, code, candidates)
    return keys, codes


@jax.jit
def _extract_into(keys, codes, fill, stored, code, candidates):
    key, code = jnp.ravel(chunk_key(stored)), jnp.ravel(code)
    take = candidates[(key >> 16).astype(jnp.int32)] & (code != SKIP)
    # Each taken entry goes to the next free place; the others are dropped (out of range).
    at = fill + jnp.cumsum(take.astype(jnp.int32)) - 1
    at = jnp.where(take, at, keys.shape[0])
    keys = keys.at[at].set(key, mode="drop")
    codes = codes.at[at].set(code, mode="drop")
    return keys, codes, fill + jnp.sum(take.astype(jnp.int32))


@jax.jit
def sparse_sweep(key: jax.Array, code: jax.Array, upto: jax.Array, n_pos: jax.Array):
    """``(f1, key)`` of the first best threshold among ``key`` (every counted score of some
    bins, see ``extract_candidates``), with ``upto`` the (neg, pos) counts in each bin and
    above it: a score's counts are its bin's ``upto`` less the scores of its bin below it."""
    key = jnp.where(code == SKIP, jnp.uint32(0), key)  # bin 0 holds no finite score
    key, code = lax.sort((key, code), num_keys=1)
    pos = (code == POS).astype(jnp.uint32)
    neg = is_negative(code).astype(jnp.uint32)
    b = (key >> 16).astype(jnp.int32)
    index = jnp.arange(key.shape[0], dtype=jnp.int32)
    new_bin = jnp.concatenate([jnp.ones(1, bool), b[1:] != b[:-1]])
    start = lax.cummax(jnp.where(new_bin, index, 0), axis=0)  # where each one's bin begins
    pos_below = jnp.cumsum(pos) - pos  # strictly before each entry, over every bin
    neg_below = jnp.cumsum(neg) - neg
    tp = upto[b, 1] - (pos_below - pos_below[start])
    fp = upto[b, 0] - (neg_below - neg_below[start])
    first = jnp.concatenate([jnp.ones(1, bool), key[1:] != key[:-1]]) & (code != SKIP)
    f1 = jnp.where(first, f1_float32(tp, fp, n_pos), -1.0)
    at = jnp.argmax(f1)  # ascending keys: the first maximum is the smallest threshold
    return f1[at], key[at]
