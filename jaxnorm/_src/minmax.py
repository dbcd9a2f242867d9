"""``MinMax``: the running minimum and maximum of anomaly scores, as a pytree."""

from __future__ import annotations

from collections.abc import Hashable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import placement, validation

ArrayLike = validation.ArrayLike


def finite_min_max_count(values, mask):
    """Returns ``(min, max, n_nonfinite)`` over the finite, unmasked entries of ``values``.

    Traced inside a jitted function (``MinMax.update``, the hook's fold).
    """
    x = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    valid = jnp.broadcast_to(mask, x.shape) if mask is not None else None

    def exact(x):
        finite = jnp.isfinite(x)
        keep = finite if valid is None else finite & valid
        nonfinite = ~finite if valid is None else ~finite & valid
        return (
            jnp.min(jnp.where(keep, x, jnp.inf), initial=jnp.inf),
            jnp.max(jnp.where(keep, x, -jnp.inf), initial=-jnp.inf),
            jnp.sum(nonfinite, dtype=jnp.uint32),
        )

    def checked(x):
        # CPU: plain min and max, trusted when every value is finite; otherwise the exact
        # masked pass runs. The finiteness check is its own reduction: XLA:CPU's vectorised
        # min/max (YNNPACK) drop NaN on large inputs, so they cannot tell, and XLA:CPU does
        # not fuse the masked reductions into one pass. A sum is NaN or inf whenever a value
        # is (and, rarely, when finite values overflow it: then the exact pass runs for
        # nothing, and still counts 0).
        lo, hi = jnp.min(x, initial=jnp.inf), jnp.max(x, initial=-jnp.inf)
        clean = jnp.isfinite(jnp.sum(x))
        # (lo != lo) is 0 on this branch; deriving it from lo keeps it varying under shard_map.
        zero = (lo != lo).astype(jnp.uint32)
        return lax.cond(clean, lambda x: (lo, hi, zero), exact, x)

    if valid is not None:
        lo, hi, n_bad = exact(x)
    else:
        # Accelerators take the branch-free exact pass: their compilers fuse the three
        # sibling reductions into one read, and a conditional there reads its predicate back
        # to the host (XLA:GPU's ConditionalThunk), which would stall every batch.
        lo, hi, n_bad = lax.platform_dependent(x, cpu=checked, default=exact)
    return lo.astype(jnp.float32), hi.astype(jnp.float32), n_bad


@flax.struct.dataclass
class MinMax:
    r"""The running minimum and maximum of scores: an immutable pytree of two float32 scalars.

    ``MinMax.empty()`` holds ``min = +inf`` and ``max = -inf``, the identity of ``merge``.
    ``merge`` is associative, commutative and idempotent, so states from batches, devices or
    processes can be folded in any order and grouping.

    Non-finite values (NaN, +-inf) are never folded in: they would poison the statistics for
    good. ``update_and_count`` says how many there were so that callers can raise.

    Example::

      stats = jaxnorm.MinMax.empty()
      for batch in val_batches:
          stats = stats.update(batch)           # jit-compiled; works inside your own jit
      scores = jaxnorm.normalize(raw, threshold, stats.min, stats.max)

    Attributes:
      min: float32 scalar (or, for a stacked state, one per leading index).
      max: float32 scalar, likewise.
    """

    min: jax.Array
    max: jax.Array

    @classmethod
    def empty(cls) -> MinMax:
        """The state that has seen nothing: ``min = +inf``, ``max = -inf``.

        Each call returns arrays of its own, so donating one state (e.g. to a jitted eval
        step with ``donate_argnums``) deletes no other.
        """
        lo, hi = _empty_fields()
        return cls(min=lo, max=hi)

    def update(self, values: ArrayLike, mask: ArrayLike | None = None) -> MinMax:
        """Folds in the finite entries of ``values`` where ``mask`` is True.

        Args:
          values: scores of any shape and real dtype (numpy or jax, sharded or not; the result
            is always the global min/max).
          mask: optional bool array broadcastable to ``values.shape``; False entries are
            ignored (padding, regions outside the object).

        Returns:
          A new ``MinMax``.
        """
        return self.update_and_count(values, mask)[0]

    def update_and_count(
        self, values: ArrayLike, mask: ArrayLike | None = None
    ) -> tuple[MinMax, jax.Array]:
        """Like ``update``, and also returns how many unmasked entries were not finite.

        Returns:
          ``(new_state, n_nonfinite)`` with ``n_nonfinite`` a uint32 scalar (per call; a single
          batch has fewer than 2**32 entries).
        """
        values = validation.as_array("values", values)
        if mask is not None:
            mask = validation.check_mask(mask, tuple(values.shape))
        # A fresh state folding committed values: placed as its successors will be, so that
        # the next update does not compile again.
        state = placement.place(self, placement.target((values,)))
        return _update(state, values, mask)

    def merge(self, other: MinMax) -> MinMax:
        """The state that has seen what ``self`` and ``other`` saw."""
        if not isinstance(other, MinMax):
            raise TypeError(
                f"MinMax.merge: expected a MinMax, got {type(other).__name__}; fold raw "
                "scores in with .update(values) instead."
            )
        return MinMax(min=jnp.minimum(self.min, other.min), max=jnp.maximum(self.max, other.max))

    def reduce(self, axis_name: Hashable | None = None) -> MinMax:
        """Merges states across devices or along a stacked leading axis.

        Args:
          axis_name: inside ``shard_map``/``pmap``, the mapped axis name (or tuple of names) to
            all-reduce over with ``lax.pmin``/``lax.pmax``: every device gets the global state.
            ``None`` (as CLU's ``Metric.reduce``) merges a state whose fields carry a leading
            axis, e.g. per-device states gathered by ``pmap`` or ``jax.vmap``.
        """
        if axis_name is None:
            if jnp.ndim(self.min) == 0:
                raise ValueError(
                    "MinMax.reduce(): this state is not stacked (its fields are scalars), so "
                    "there is no leading axis to merge over. Inside shard_map/pmap pass the "
                    "mapped axis name, reduce(axis_name='data'); otherwise stack per-device "
                    "states first (jax.tree.map(jnp.stack, ...)), or use merge."
                )
            # initial: a stack of no states merges to the empty state, merge's identity.
            return MinMax(
                min=jnp.min(self.min, axis=0, initial=jnp.inf),
                max=jnp.max(self.max, axis=0, initial=-jnp.inf),
            )
        return MinMax(min=lax.pmin(self.min, axis_name), max=lax.pmax(self.max, axis_name))

    def __iter__(self):
        """Unpacks as ``lo, hi = stats``."""
        return iter((self.min, self.max))

    @property
    def is_empty(self) -> jax.Array:
        """True while no finite value has been folded in."""
        return self.min > self.max


def _empty_fields() -> tuple[jax.Array, jax.Array]:
    # Fresh arrays at every call, never a cached pair: a state may be donated
    # (``jax.jit(step, donate_argnums=...)``), which deletes its arrays, and a pair shared by
    # every empty state would then be deleted for all of them (issue 20). One transfer call
    # for both. Made lazily (not at import, which would start jax's backends before a user's
    # jax.distributed.initialize) and concretely, even when asked for under a trace.
    with jax.ensure_compile_time_eval():
        return tuple(jax.device_put((np.float32(np.inf), np.float32(-np.inf))))


@jax.jit
def _update(state: MinMax, values, mask):
    lo, hi, n_bad = finite_min_max_count(values, mask)
    return state.merge(MinMax(min=lo, max=hi)), n_bad
