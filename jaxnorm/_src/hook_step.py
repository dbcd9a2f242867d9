"""The hook's per-batch work: one jitted dispatch per batch, and no device-to-host read.

Validation folds every statistic a batch feeds into ``HookState``, which stays on the device.
Whether a batch is folded is decided there too: under ``nonfinite="raise"`` a batch with any
non-finite value keeps the old state (a select, not a host branch), and the first such batch
is recorded (key, count, batch index) for the host to raise when it next reads the state.
Test and predict normalize every present key in one call.

Counters are exact ``uint32`` (high, low) pairs: they never wrap, with or without x64.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.minmax import MinMax, _finite_min_max_count
from jaxnorm._src.normalize import _math
from jaxnorm._src.outputs import IMAGE, NORMALIZED_KEYS, PIXEL, NormalizationStats

# Output keys by id, for the error record (the order of anomalib's precedence).
KEYS = ("anomaly_maps", "box_scores", "pred_scores")
_WHICH = {IMAGE: 0, PIXEL: 1}
NO_ERROR = (-1, 0)  # (key id, batch index) of the first rejected batch: none


@flax.struct.dataclass
class HookState:
    """Everything validation accumulates, on the device.

    Attributes:
      stats: the image and pixel statistics.
      num_values: uint32 [2, 2]: values folded, per statistic (image, pixel), as (high, low).
      num_nonfinite: uint32 [2, 2]: non-finite values skipped under ``"omit"``, likewise.
      batch: int32: validation batches seen this epoch.
      rejected: uint32 [2]: non-finite values in batches rejected this epoch (``"raise"``).
      first_bad: int32 [2]: (key id in ``KEYS``, batch index) of the first rejected batch
        not reported yet, or ``NO_ERROR``.
      first_bad_count: uint32: how many values of that key were not finite.
    """

    stats: NormalizationStats
    num_values: jax.Array
    num_nonfinite: jax.Array
    batch: jax.Array
    rejected: jax.Array
    first_bad: jax.Array
    first_bad_count: jax.Array

    @classmethod
    def initial(
        cls,
        stats: NormalizationStats | None = None,
        num_values: Mapping[str, int] | None = None,
        num_nonfinite: Mapping[str, int] | None = None,
    ) -> HookState:
        """A fresh state (built on the host, transferred in one call: nothing compiles)."""
        stats = NormalizationStats.empty() if stats is None else stats
        counts = [
            np.stack([pair(dict(c or {}).get(w, 0)) for w in (IMAGE, PIXEL)])
            for c in (num_values, num_nonfinite)
        ]
        fields = jax.device_put(
            (counts[0], counts[1], *_epoch_fields()),
        )
        return cls(stats, *fields)

    def new_epoch(self) -> HookState:
        """The same statistics and counters, with this epoch's record cleared."""
        batch, rejected, first_bad, count = jax.device_put(_epoch_fields())
        return self.replace(
            batch=batch, rejected=rejected, first_bad=first_bad, first_bad_count=count
        )

    def reported(self) -> HookState:
        """The state once its first rejected batch was reported: ready to record the next."""
        first_bad, count = jax.device_put(_epoch_fields()[2:])
        return self.replace(first_bad=first_bad, first_bad_count=count)


def _epoch_fields() -> tuple[np.ndarray, ...]:
    return (
        np.int32(0),
        np.zeros(2, np.uint32),
        np.array(NO_ERROR, np.int32),
        np.uint32(0),
    )


def pair(n: int) -> np.ndarray:
    """A count as a uint32 (high, low) pair."""
    n = int(n)
    if not 0 <= n < 2**64:
        raise ValueError(f"count {n} is out of range: expected 0 <= count < 2**64.")
    return np.array([n >> 32, n & 0xFFFFFFFF], np.uint32)


def count(p) -> int:
    """A uint32 (high, low) pair, read on the host, as a Python int."""
    p = np.asarray(p)
    return (int(p[..., 0]) << 32) | int(p[..., 1])


def _add(p: jax.Array, n: jax.Array) -> jax.Array:
    """``p + n`` for a (high, low) pair ``p`` and a uint32 ``n``, with the carry."""
    n = n.astype(jnp.uint32)
    low = p[..., 1] + n
    high = p[..., 0] + (low < n).astype(jnp.uint32)
    return jnp.stack([high, low], axis=-1)


@functools.partial(jax.jit, static_argnames=("routes", "omit"))
def fold(
    state: HookState,
    values: dict[str, jax.Array],
    rows: dict[str, jax.Array],
    *,
    routes: tuple[tuple[tuple[str, ...], str], ...],
    omit: bool,
) -> HookState:
    """Folds one validation batch into ``state``: every key, one dispatch.

    Args:
      state: the running state.
      values: the arrays of the keys in ``routes``. A key also in ``rows`` is padded along
        its leading axis: only its first ``rows[key]`` rows (entries, for 1-D box scores)
        are data.
      rows: int32 scalars, the valid leading length of each padded key.
      routes: ``((statistics, key), ...)`` from ``outputs.stats_sources``.
      omit: skip non-finite values (``"omit"``) rather than reject the batch (``"raise"``).
    """
    parts = []
    for which, key in routes:
        x = values[key]
        if key in rows:
            r = rows[key]
            valid = jnp.arange(x.shape[0]) < r
            mask = valid.reshape((-1,) + (1,) * (x.ndim - 1))
            row_size = x.size // x.shape[0] if x.shape[0] else 0
            n = r.astype(jnp.uint32) * jnp.uint32(row_size)
        else:
            mask, n = None, jnp.uint32(x.size)
        lo, hi, n_bad = _finite_min_max_count(x, mask)
        parts.append((which, key, MinMax(min=lo, max=hi), n_bad, n))

    total_bad = sum((p[3] for p in parts), jnp.uint32(0))
    ok = jnp.bool_(True) if omit else total_bad == 0
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))

    stats = {IMAGE: state.stats.image, PIXEL: state.stats.pixel}
    num_values, num_nonfinite = state.num_values, state.num_nonfinite
    for which, _, batch_stats, n_bad, n in parts:
        folded = stats[which[0]].merge(batch_stats)
        for w in which:
            i = _WHICH[w]
            stats[w] = keep(folded, stats[w])
            num_values = num_values.at[i].set(_add(num_values[i], jnp.where(ok, n, 0)))
            if omit:
                num_nonfinite = num_nonfinite.at[i].set(_add(num_nonfinite[i], n_bad))

    rejected, first_bad, first_count = state.rejected, state.first_bad, state.first_bad_count
    if not omit:
        # The first key (in route order) with non-finite values names the batch's error.
        key_id, key_count = jnp.int32(-1), jnp.uint32(0)
        for _, key, _, n_bad, _ in reversed(parts):
            key_id = jnp.where(n_bad > 0, KEYS.index(key), key_id)
            key_count = jnp.where(n_bad > 0, n_bad, key_count)
        new_error = ~ok & (first_bad[0] < 0)
        first_bad = jnp.where(new_error, jnp.stack([key_id, state.batch]), first_bad)
        first_count = jnp.where(new_error, key_count, first_count)
        rejected = _add(rejected, total_bad)

    return HookState(
        stats=NormalizationStats(image=stats[IMAGE], pixel=stats[PIXEL]),
        num_values=num_values,
        num_nonfinite=num_nonfinite,
        batch=state.batch + 1,
        rejected=rejected,
        first_bad=first_bad,
        first_bad_count=first_count,
    )


@jax.jit
def normalize_all(values: dict[str, jax.Array], params: jax.Array) -> dict[str, jax.Array]:
    """Normalizes every key of ``values`` in one call.

    Args:
      values: arrays keyed by ``pred_scores``, ``anomaly_maps`` or ``box_scores`` (padded).
      params: ``[[image threshold, min, max], [pixel threshold, min, max]]``.
    """
    out = {}
    for key, x in values.items():
        t, lo, hi = params[_WHICH[NORMALIZED_KEYS[key]]]
        out[key] = _math(x, t, lo, hi)
    return out
