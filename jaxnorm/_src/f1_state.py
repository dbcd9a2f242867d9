"""``F1AdaptiveThreshold``: anomalib's F1 adaptive threshold as a streaming pytree."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import f1_buffer, f1_collective, f1_curve, f1_slots, placement, validation
from jaxnorm._src.f1_curve import neg_pos
from jaxnorm._src.f1_inputs import (
    NonFinitePolicy,
    check_inputs,
    check_policy,
    key_range,
    prepare,
    raise_if_nonfinite,
)
from jaxnorm._src.f1_keys import N_BINS, N_CLASSES, as_float32, from_key
from jaxnorm._src.f1_threshold import fallback_end

ArrayLike = validation.ArrayLike
Mode = Literal["exact", "bounded"]
MODES = ("exact", "bounded")
DEFAULT_SLOTS = 32
DEFAULT_BUFFER = 1 << 16
_NO_KEY = 0xFFFF_FFFF  # above every score's key: an empty bin's minimum
_HALF = (jnp.float16, jnp.bfloat16)


class F1Result(NamedTuple):
    """What ``F1AdaptiveThreshold.compute_with_bound`` returns.

    Attributes:
      threshold: float32 0-d array, the threshold (what ``compute`` returns).
      f1: float32, anomalib's f1 at it (``nan`` for a one-class fallback, which has none).
      max_f1_lost: float32, at most how much lower ``f1`` is than the f1 at anomalib's
        threshold; 0 means the threshold is anomalib's (always so in exact mode).
    """

    threshold: jax.Array
    f1: jax.Array
    max_f1_lost: jax.Array


@flax.struct.dataclass
class F1AdaptiveThreshold:
    r"""anomalib's F1 adaptive threshold, folded batch by batch: an immutable pytree.

    ``update`` folds a batch of scores and labels in one jitted call with no read back to
    the host; ``compute`` returns the threshold that ``jaxnorm.f1_adaptive_threshold``
    (and anomalib 2.7's ``F1AdaptiveThreshold``) gives on everything folded in.

    Two modes:

    - ``"exact"`` (default): counts per bin of the scores' float bits (512 KiB), and every
      counted score as a uint32 key (float16/bfloat16 as scores) plus a one-byte label:
      no more than anomalib's metric keeps (every score and target). ``compute`` resolves
      only the bins where the best F1 can lie (see ``jaxnorm._src.f1_curve``); the
      threshold is anomalib's, bit for bit as float32.
    - ``"bounded"``: fixed memory, ``(slots + 1) x 512 KiB`` whatever the data size, and
      jittable end to end (``update`` inside your own ``jit``/``shard_map`` step). Beside
      the bin counts it keeps exact counts for ``slots`` bins picked while the data
      streams (see ``jaxnorm._src.f1_slots``). When those cover every bin where the best
      F1 can lie, the threshold is anomalib's; otherwise ``compute_with_bound`` says at
      most how much F1 it may have lost (never more than the largest count of negatives
      in one bin over twice the number of positives).

    Example::

      state = jaxnorm.F1AdaptiveThreshold.empty()
      for maps, masks in val_batches:
          state = state.update(maps, masks)      # one jitted call, nothing read back
      pixel_threshold = state.compute()

    ``merge`` folds states of other batches, devices or processes; ``reduce`` merges
    inside ``shard_map``/``pmap`` or along a stacked axis; ``compute(reducer=...)`` merges
    across processes (``jax.distributed``, or Lightning DDP through ``torch_compat``) with
    two small all-reduces instead of gathering every score.

    Attributes:
      counts: uint32 ``[65536, 3]``: per bin, the scores with label 0, label 1, and
        another label (anomalib looks for 0 and 1; the rest count as negatives).
      n_values: uint32 ``[2]``: values counted, low word and carries.
      n_nonfinite: uint32: NaN/inf scores seen (not counted).
      bin_min, bin_max: bounded mode: uint32 ``[65536]``, the order keys of the smallest
        and largest score of each bin (empty in exact mode).
      slot_bins, slot_complete, fine: the bounded mode's slots (empty in exact mode).
      chunks: exact mode: ``((keys, labels), ...)`` per batch.
      mode, nonfinite: static: the mode, and the non-finite policy.
    """

    counts: jax.Array
    n_values: jax.Array
    n_nonfinite: jax.Array
    bin_min: jax.Array
    bin_max: jax.Array
    slot_bins: jax.Array
    slot_complete: jax.Array
    fine: jax.Array
    buf_keys: jax.Array
    buf_codes: jax.Array
    buf_fill: jax.Array
    chunks: tuple = ()
    mode: str = flax.struct.field(pytree_node=False, default="exact")
    nonfinite: str = flax.struct.field(pytree_node=False, default="raise")

    @classmethod
    def empty(
        cls,
        mode: Mode = "exact",
        *,
        slots: int = DEFAULT_SLOTS,
        buffer: int = DEFAULT_BUFFER,
        nonfinite: NonFinitePolicy = "raise",
    ) -> F1AdaptiveThreshold:
        """The state that has seen nothing.

        Args:
          mode: ``"exact"`` or ``"bounded"`` (see the class docstring).
          slots: bounded mode: how many bins get exact counts (512 KiB each).
          buffer: bounded mode: up to this many scores are kept whole (5 bytes each), so
            that smaller sets (image scores) are always exact; 0 keeps none.
          nonfinite: ``"raise"``: a batch with NaN/inf scores is not counted, and
            ``compute`` raises ``jaxnorm.NonFiniteScoresError`` with their number.
            ``"omit"``: they are left out, with their labels.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
        check_policy(nonfinite)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r}: expected a positive int (bins with exact counts).")
        if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer < 2**31:
            raise ValueError(f"buffer={buffer!r}: expected an int >= 0 (scores kept whole).")
        bounded = mode == "bounded"
        fields = _empty_fields(slots if bounded else 0, buffer if bounded else 0)
        return cls(*fields, chunks=(), mode=mode, nonfinite=nonfinite)

    def update(
        self,
        scores: ArrayLike,
        labels: ArrayLike,
        mask: ArrayLike | None = None,
        *,
        axis_name: Hashable | None = None,
    ) -> F1AdaptiveThreshold:
        """Folds in one batch: pure, one jitted call, nothing read back to the host.

        Args:
          scores: anomaly scores of any shape and real dtype (numpy or jax, sharded or not).
          labels: one label per score (bool or numbers: anomalib counts ``== 1`` as
            anomalous and looks for ``== 0`` as normal; a 0/255 mask has no anomaly).
          mask: optional bool array broadcastable to ``scores``: False entries are left
            out, scores and labels (padding).
          axis_name: bounded mode inside ``shard_map``/``pmap``: the mapped axis, so that
            every device gives its slots to the same bins (their counts then merge
            exactly in ``reduce``). Costs one all-reduce of the bin counts per batch.

        Returns:
          A new state (exact mode: holding this batch's keys and labels too).
        """
        where = "F1AdaptiveThreshold.update"
        scores, labels, mask = check_inputs(where, scores, labels, mask)
        traced = any(validation.is_tracer(x) for x in (scores, labels, mask))
        if self.mode == "exact" and traced:
            raise ValueError(
                f"{where}: an exact state keeps every score, so it grows with each batch and "
                "cannot be carried through jit. Inside a jitted step use "
                "F1AdaptiveThreshold.empty(mode='bounded'), or update eagerly (each update "
                "is one jitted call already)."
            )
        fixed = placement.place(self._fixed(), placement.target((scores,)))
        fixed, stored, code = _fold(
            fixed,
            scores,
            labels,
            mask,
            keep=self.mode == "exact",
            axis_name=axis_name,
        )
        chunks = self.chunks + ((stored, code),) if self.mode == "exact" else ()
        return self._with(fixed, chunks)

    def merge(self, other: F1AdaptiveThreshold) -> F1AdaptiveThreshold:
        """The state that has seen what ``self`` and ``other`` saw (same mode).

        Exact states merge exactly. Bounded states add their counts; slots merge as
        ``jaxnorm._src.f1_slots.merge`` says (exactly when both gave them to the same bins,
        as ``update(..., axis_name=...)`` does).
        """
        if not isinstance(other, F1AdaptiveThreshold):
            raise TypeError(
                f"F1AdaptiveThreshold.merge: expected an F1AdaptiveThreshold, got "
                f"{type(other).__name__}; fold scores in with .update(scores, labels)."
            )
        if other.mode != self.mode or other.fine.shape != self.fine.shape:
            raise ValueError(
                f"F1AdaptiveThreshold.merge: a {self.mode} state with {self.fine.shape[0]} "
                f"slots and a {other.mode} state with {other.fine.shape[0]}; merge states "
                "made by the same F1AdaptiveThreshold.empty(...) call."
            )
        fixed = _merge_fixed(self._fixed(), other._fixed())
        return self._with(fixed, self.chunks + other.chunks)

    def reduce(self, axis_name: Hashable | None = None) -> F1AdaptiveThreshold:
        """Merges states across devices, or along a stacked leading axis.

        Args:
          axis_name: inside ``shard_map``/``pmap``, the mapped axis: every device gets the
            merged state (states are gathered, so exact states gather every key). ``None``
            merges a state whose fields carry a leading axis (per-device states stacked).
        """
        if axis_name is None:
            if self.counts.ndim != 3:
                raise ValueError(
                    "F1AdaptiveThreshold.reduce(): this state is not stacked, so there is no "
                    "leading axis to merge over; inside shard_map pass reduce(axis_name=...)."
                )
            stacked = self
        else:
            stacked = jax.tree.map(lambda x: lax.all_gather(x, axis_name), self)
        n = stacked.counts.shape[0]
        parts = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
        out = parts[0]
        for part in parts[1:]:
            out = out.merge(part)
        if self.mode == "exact":
            flat = tuple((s.reshape(-1), c.reshape(-1)) for s, c in stacked.chunks)
            out = out.replace(chunks=flat)
        if axis_name is not None:
            # The same on every device already; a max over equal values says so to
            # shard_map, which otherwise sees values derived from a gather as varying.
            out = jax.tree.map(functools.partial(_same_everywhere, axis_name=axis_name), out)
        return out

    def compute(self, reducer=None) -> jax.Array:
        """The threshold: a float32 0-d array (see ``compute_with_bound`` for the args)."""
        return self.compute_with_bound(reducer).threshold

    def compute_with_bound(self, reducer=None) -> F1Result:
        """The threshold, its f1, and how much f1 it may have lost (bounded mode).

        Reads the counts back to the host: call it once, after validation.

        Args:
          reducer: to merge across processes, a ``jaxnorm.Reducer`` (``(mins, maxs,
            counts) -> (mins, maxs, counts)``, min, max and sum over processes), e.g.
            ``jaxnorm.distributed.allreduce_across_processes`` or torch_compat's DDP one.
            A collective: every process calls it, the same number of times. Each process
            sends its bin counts, then exact counts of the few bins where the best F1 can
            lie, never its scores.

        Raises:
          ValueError: nothing was counted, or more than 2**32 - 1 values were.
          jaxnorm.NonFiniteScoresError: NaN/inf scores were seen under ``"raise"``.
        """
        where = "F1AdaptiveThreshold.compute"
        if self.counts.ndim != 2:
            raise ValueError(f"{where}: a stacked state; merge it with .reduce() first.")
        counts, n_values, n_bad, fill = jax.device_get(
            (self.counts, self.n_values, self.n_nonfinite, self.buf_fill)
        )
        whole = f1_buffer.holds_all(int(fill), self.buf_keys.shape[0])
        facts = f1_collective.Facts(
            counts, int(n_values[0]) + (int(n_values[1]) << 32), int(n_bad), int(whole)
        )
        if reducer is not None:
            facts = f1_collective.reduce_facts(reducer, facts)
        raise_if_nonfinite(where, facts.n_nonfinite, self.nonfinite)
        if facts.n_values >= 1 << 32:
            raise ValueError(
                f"{where}: {facts.n_values} values were counted; counts are uint32, so a state "
                "holds fewer than 2**32. Compute thresholds on a sample of the pixels."
            )
        n_zero, n_pos, n_other = (int(x) for x in facts.counts.sum(axis=0, dtype=np.int64))
        end = fallback_end(where, n_pos, n_zero + n_other, n_zero > 0)
        if end is not None:
            lo, hi = self._key_range(reducer)
            key = jnp.uint32(hi if end == "max" else lo)
            return F1Result(_value(key), jnp.float32(np.nan), jnp.float32(0))
        if reducer is not None:
            key, f1, lost = f1_collective.global_best(reducer, self, facts)
        elif self.mode == "exact":
            key, f1, lost = _exact_best(self.counts, self.chunks, n_pos + n_zero + n_other)
        elif whole:
            f1, key = f1_curve.sort_sweep(*_head(self.buf_keys, self.buf_codes, _bucket(fill)))
            lost = 0.0
        else:
            key, f1, lost = _bounded_best(
                neg_pos(self.counts), self.slot_bins, self.slot_complete, self.fine, self.bin_min
            )
        return F1Result(_value(key), jnp.float32(f1), jnp.float32(lost))

    def _key_range(self, reducer) -> tuple[int, int]:
        """The smallest and largest counted key (of every process, with a reducer)."""
        if self.mode == "exact":
            chunks = self.chunks
            lo, hi = key_range(chunks)
        else:
            lo, hi = _local_range(self.counts, self.bin_min, self.bin_max)
        lo, hi = int(lo), int(hi)
        if reducer is not None:
            lo, hi = f1_collective.reduce_range(reducer, lo, hi)
        return lo, hi

    @property
    def num_nonfinite(self) -> int:
        """NaN/inf scores seen so far (reads the count back to the host)."""
        return int(self.n_nonfinite)

    def _fixed(self) -> tuple:
        return (
            self.counts,
            self.n_values,
            self.n_nonfinite,
            self.bin_min,
            self.bin_max,
            self.slot_bins,
            self.slot_complete,
            self.fine,
            self.buf_keys,
            self.buf_codes,
            self.buf_fill,
        )

    def _with(self, fixed: tuple, chunks: tuple) -> F1AdaptiveThreshold:
        return F1AdaptiveThreshold(*fixed, chunks=chunks, mode=self.mode, nonfinite=self.nonfinite)


@functools.cache
def _empty_fields(n_slots: int, buffer: int) -> tuple:
    # Immutable arrays, shared by every empty state; made lazily and concretely (see
    # MinMax's _empty_fields).
    with jax.ensure_compile_time_eval():
        return (
            jnp.zeros((N_BINS, N_CLASSES), jnp.uint32),
            jnp.zeros(2, jnp.uint32),
            jnp.zeros((), jnp.uint32),
            jnp.full(N_BINS if n_slots else 0, _NO_KEY, jnp.uint32),
            jnp.zeros(N_BINS if n_slots else 0, jnp.uint32),
            jnp.full(n_slots, -1, jnp.int32),
            jnp.zeros(n_slots, bool),
            jnp.zeros((n_slots, N_BINS, 2), jnp.uint32),
            *f1_buffer.empty(buffer),
        )


@functools.partial(jax.jit, static_argnames=("keep", "axis_name"))
def _fold(fixed, scores, labels, mask, keep, axis_name):
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


def _bucket(n: int) -> int:
    """A power of two >= ``n`` (at least 1024): the sizes a sort compiles for."""
    return max(1024, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=2)
def _head(keys, codes, n: int):
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


def _same_everywhere(x, axis_name):
    if x.dtype == jnp.bool_:
        return lax.pmax(x.astype(jnp.uint8), axis_name).astype(bool)
    return lax.pmax(x, axis_name)


def _add_count(words, n):
    low = words[0] + n
    return jnp.stack([low, words[1] + (low < words[0]).astype(jnp.uint32)])


@jax.jit
def _merge_fixed(a, b):
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
def _local_range(counts, bin_min, bin_max):
    """The smallest and largest counted key, from a bounded state's per-bin extremes."""
    nonempty = jnp.sum(counts, axis=1) > 0
    lo = jnp.min(jnp.where(nonempty, bin_min, jnp.uint32(_NO_KEY)))
    hi = jnp.max(jnp.where(nonempty, bin_max, jnp.uint32(0)))
    return lo, hi


def _exact_best(counts, chunks, n_total):
    if n_total <= f1_curve.SORT_BELOW:
        f1, key = f1_curve.sort_sweep(*f1_curve.padded_keys(chunks))
    else:
        f1, key = f1_curve.best_threshold_key(neg_pos(counts), list(chunks))
    return key, f1, 0.0


_bounded_best = jax.jit(f1_slots.result)


@jax.jit
def _value(key):
    return from_key(key, jnp.float32)
