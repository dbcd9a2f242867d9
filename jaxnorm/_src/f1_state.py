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

from jaxnorm._src import (
    f1_buffer,
    f1_collective,
    f1_curve,
    f1_fold,
    f1_slots,
    placement,
    validation,
)
from jaxnorm._src.f1_curve import neg_pos
from jaxnorm._src.f1_inputs import (
    NonFinitePolicy,
    check_inputs,
    check_policy,
    key_range,
    raise_if_nonfinite,
)
from jaxnorm._src.f1_keys import from_key
from jaxnorm._src.f1_threshold import fallback_end

ArrayLike = validation.ArrayLike
Mode = Literal["exact", "bounded"]
MODES = ("exact", "bounded")
DEFAULT_SLOTS = 32
DEFAULT_BUFFER = 1 << 16


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

    - ``"exact"`` (default): counts per bin of the scores' float bits (768 KiB), and every
      counted score (a float copy of each batch) plus a one-byte label: no more than
      anomalib's metric keeps (every score and target). ``compute`` resolves only the bins
      where the best F1 can lie (see ``jaxnorm._src.f1_curve``); the threshold is
      anomalib's, bit for bit as float32.
    - ``"bounded"``: fixed memory whatever the data size (about 18 MiB with the defaults),
      and jittable (``update`` inside your own ``jit``/``shard_map`` step). It keeps up to
      ``buffer`` scores whole, so smaller sets are exact; beyond, exact counts for
      ``slots`` bins picked as the data streams (see ``jaxnorm._src.f1_slots``). When those
      cover every bin where the best F1 can lie, the threshold is anomalib's; otherwise
      ``compute_with_bound`` says at most how much F1 it may have lost (never more than
      the largest count of negatives in one bin over twice the number of positives). On
      CPU each ``update`` copies the slots (16 MiB with 32 slots).

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
      n_nonfinite: uint32: NaN/inf scores seen (never in the counts).
      bin_min, bin_max: bounded mode: uint32 ``[65536]``, the order keys of the smallest
        and largest score of each bin (empty in exact mode).
      slot_bins, slot_complete, fine: the bounded mode's slots (empty in exact mode).
      buf_keys, buf_codes, buf_fill: the bounded mode's small-set buffer (order keys,
        label codes, entries used; ``buffer + 1`` once it overflowed).
      chunks: exact mode: ``((scores, label codes), ...)`` per batch.
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
          nonfinite: ``"raise"``: NaN/inf scores are counted apart, and ``compute``
            raises ``jaxnorm.NonFiniteScoresError`` with their number (``update`` reads
            nothing back, so it cannot raise). ``"omit"``: they are left out, with their
            labels.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}.")
        check_policy(nonfinite)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r}: expected a positive int (bins with exact counts).")
        if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer < 2**31:
            raise ValueError(f"buffer={buffer!r}: expected an int >= 0 (scores kept whole).")
        bounded = mode == "bounded"
        fields = f1_fold.empty_fields(slots if bounded else 0, buffer if bounded else 0)
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
                "F1AdaptiveThreshold.empty(mode='bounded'), or fold_batch and append_chunk "
                "(see fold_batch), or update eagerly (each update is one jitted call already)."
            )
        state = self._with(placement.place(self._fixed(), placement.target((scores,))), self.chunks)
        state, chunk = state.fold_batch(scores, labels, mask, axis_name=axis_name)
        return state.append_chunk(chunk)

    def fold_batch(self, scores, labels, mask=None, *, axis_name=None):
        """``update`` split for a caller's own jitted step that carries the state: pure.

        Returns ``(state, chunk)``: the state with this batch counted, its chunks as they
        were, and, in exact mode, the batch's stored scores and label codes (``None`` in
        bounded mode). A step that carries an exact state carries it without chunks
        (``state.replace(chunks=())``: then its structure never changes, and the step
        compiles once), keeps the chunks outside, and puts them back before ``compute``
        (``state.replace(chunks=tuple(chunks))``). Arguments as ``update``'s.
        """
        fixed, stored, code = f1_fold.fold(
            self._fixed(),
            scores,
            labels,
            mask,
            keep=self.mode == "exact",
            axis_name=axis_name,
        )
        return self._with(fixed, self.chunks), (stored, code) if self.mode == "exact" else None

    def append_chunk(self, chunk) -> F1AdaptiveThreshold:
        """The state with ``fold_batch``'s chunk kept (exact mode; ``None`` is a no-op)."""
        if chunk is None:
            return self
        return self._with(self._fixed(), self.chunks + (tuple(chunk),))

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
        fixed = f1_fold.merge_fixed(self._fixed(), other._fixed())
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
            out = jax.tree.map(functools.partial(f1_fold.same_everywhere, axis_name=axis_name), out)
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
            f1, key = f1_curve.sort_sweep(
                *f1_fold.head(self.buf_keys, self.buf_codes, f1_fold.bucket(fill))
            )
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
            lo, hi = f1_fold.local_range(self.counts, self.bin_min, self.bin_max)
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
