"""The hook's validation state and its fold: one jitted dispatch per batch, no host read.

Validation folds every statistic a batch feeds into ``HookState``, which stays on the device.
Whether a batch is folded is decided there too: under ``nonfinite="raise"`` a batch with any
non-finite value keeps the old state (a select, not a host branch), and the first such batch
is recorded (key, count, batch index) for the host to raise when it next reads the state.

Counters are exact ``uint32`` (high, low) pairs: they never wrap, with or without x64.

The same dispatch folds the F1 thresholds' states when a batch feeds them (``f1_routes``):
each is ``F1AdaptiveThreshold``'s arrays in exact mode, and the batch's stored scores and
label codes come back for the host to keep (``f1_epoch.EpochF1``). A rejected batch keeps
the old F1 states too, and its codes say "not counted".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import f1_fold
from jaxnorm._src.f1_keys import SKIP
from jaxnorm._src.minmax import MinMax, finite_min_max_count
from jaxnorm._src.stats import IMAGE, PIXEL, NormalizationStats

# Output keys by id, for the error record (the order of anomalib's precedence).
KEYS = ("anomaly_maps", "box_scores", "pred_scores")
_WHICH = {IMAGE: 0, PIXEL: 1}

# The layout of ``HookState.counters``, one uint32 vector (each buffer a jitted call takes or
# returns costs host time, so the counters travel as one). Counts are (high, low) pairs.
NUM_VALUES = (0, 2)  # image pair, pixel pair at [0:2], [2:4]
NUM_NONFINITE = (4, 6)  # likewise, values skipped under "omit"
REJECTED = 8  # pair: non-finite values in batches rejected this epoch ("raise")
BATCH = 10  # validation batches seen this epoch
BAD_KEY = 11  # 1 + the id in KEYS of the first rejected batch's key not reported; 0: none
BAD_BATCH = 12  # that batch's index in the epoch
BAD_COUNT = 13  # how many of that key's values were not finite
_SIZE = 14
_EPOCH = slice(REJECTED, _SIZE)  # what a new epoch clears


@flax.struct.dataclass
class HookState:
    """Everything validation accumulates, on the device.

    Attributes:
      stats: the image and pixel statistics.
      counters: uint32 [14], laid out as the constants above say; read it with ``Record``.
      f1: ``()`` until a batch feeds the F1 thresholds, then the image and pixel
        ``F1AdaptiveThreshold`` arrays (exact mode, ``F1AdaptiveThreshold._fixed``'s order).
    """

    stats: NormalizationStats
    counters: jax.Array
    f1: tuple = ()

    @classmethod
    def initial(
        cls,
        stats: NormalizationStats | None = None,
        num_values: Mapping[str, int] | None = None,
        num_nonfinite: Mapping[str, int] | None = None,
    ) -> HookState:
        """A fresh state (built on the host, transferred in one call: nothing compiles)."""
        stats = NormalizationStats.empty() if stats is None else stats
        counters = np.zeros(_SIZE, np.uint32)
        for start, counts in ((NUM_VALUES[0], num_values), (NUM_NONFINITE[0], num_nonfinite)):
            for i, w in enumerate((IMAGE, PIXEL)):
                counters[start + 2 * i : start + 2 * i + 2] = pair(dict(counts or {}).get(w, 0))
        return cls(stats, jax.device_put(counters))

    def with_counters(self, counters: np.ndarray) -> HookState:
        return self.replace(counters=jax.device_put(counters))


class Record:
    """``HookState.counters`` read on the host (one transfer), as Python ints."""

    def __init__(self, counters: jax.Array | np.ndarray) -> None:
        self.raw = np.array(jax.device_get(counters))
        c = self.raw
        self.num_values = {w: count(c[NUM_VALUES[i] : NUM_VALUES[i] + 2]) for i, w in _NAMES}
        self.num_nonfinite = {
            w: count(c[NUM_NONFINITE[i] : NUM_NONFINITE[i] + 2]) for i, w in _NAMES
        }
        self.rejected = count(c[REJECTED : REJECTED + 2])
        self.bad_key = KEYS[int(c[BAD_KEY]) - 1] if c[BAD_KEY] else None
        self.bad_batch = int(c[BAD_BATCH])
        self.bad_count = int(c[BAD_COUNT])

    def new_epoch(self) -> np.ndarray:
        """The counters with this epoch's record cleared."""
        out = self.raw.copy()
        out[_EPOCH] = 0
        return out

    def reported(self) -> np.ndarray:
        """The counters once the first rejected batch was reported: ready for the next."""
        out = self.raw.copy()
        out[[BAD_KEY, BAD_BATCH, BAD_COUNT]] = 0
        return out


_NAMES = tuple(enumerate((IMAGE, PIXEL)))


def pair(n: int) -> np.ndarray:
    """A count as a uint32 (high, low) pair."""
    n = int(n)
    if not 0 <= n < 2**64:
        raise ValueError(f"count {n} is out of range: expected 0 <= count < 2**64.")
    return np.array([n >> 32, n & 0xFFFFFFFF], np.uint32)


def count(p) -> int:
    """A uint32 (high, low) pair, read on the host, as a Python int."""
    return (int(p[0]) << 32) | int(p[1])


def _valid_rows(x: jax.Array, rows: dict, key: str):
    """``(mask, n)``: which entries of ``x`` are data (``None``: all) and how many."""
    if key not in rows:
        return None, jnp.uint32(x.size)
    r = rows[key]
    valid = jnp.arange(x.shape[0]) < r
    row_size = x.size // x.shape[0] if x.shape[0] else 0
    return valid.reshape((-1,) + (1,) * (x.ndim - 1)), r.astype(jnp.uint32) * jnp.uint32(row_size)


@functools.partial(jax.jit, static_argnames=("routes", "omit", "f1_routes"))
def fold(
    state: HookState,
    values: dict[str, jax.Array],
    rows: dict[str, jax.Array],
    *,
    routes: tuple[tuple[tuple[str, ...], str], ...],
    omit: bool,
    f1_routes: tuple[tuple[int, str, str], ...] = (),
) -> tuple[HookState, tuple]:
    """Folds one validation batch into ``state``: every key, one dispatch.

    Args:
      state: the running state (with F1 states when ``f1_routes`` is not empty).
      values: the arrays of the keys in ``routes`` and ``f1_routes``. A key also in ``rows``
        is padded along its leading axis: only its first ``rows[key]`` rows (entries, for
        1-D box scores) are data.
      rows: int32 scalars, the valid leading length of each padded key.
      routes: ``((statistics, key), ...)`` from ``stats.stats_sources``.
      omit: skip non-finite values (``"omit"``) rather than reject the batch (``"raise"``).
      f1_routes: ``((index in state.f1, score key, label key), ...)``: the F1 states this
        batch feeds, with one label per score (``f1_epoch.routes``).

    Returns:
      ``(state, chunks)``: the new state, and per F1 route the batch's stored scores and
      label codes (what an exact ``F1AdaptiveThreshold`` keeps).
    """
    parts = []
    for which, key in routes:
        x = values[key]
        mask, n = _valid_rows(x, rows, key)
        lo, hi, n_bad = finite_min_max_count(x, mask)
        parts.append((which, key, MinMax(min=lo, max=hi), n_bad, n))

    f1 = list(state.f1)
    folded_f1 = []
    stat_keys = {key for _, key in routes}
    for i, key, label_key in f1_routes:
        x = values[key]
        mask, _ = _valid_rows(x, rows, key)
        labels = values[label_key].reshape(x.shape)
        fixed, stored, code = f1_fold.fold(f1[i], x, labels, mask, keep=True, axis_name=None)
        folded_f1.append((i, fixed, stored, code))
        if key not in stat_keys:  # scores only the threshold reads: their non-finite count
            n_bad = fixed[2] - f1[i][2]
            parts.append(((), key, None, n_bad, jnp.uint32(0)))
            stat_keys.add(key)

    total_bad = sum((p[3] for p in parts), jnp.uint32(0))
    ok = jnp.bool_(True) if omit else total_bad == 0
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    chunks = []
    for i, fixed, stored, code in folded_f1:
        f1[i] = keep(fixed, f1[i])
        chunks.append((stored, jnp.where(ok, code, jnp.uint8(SKIP))))

    stats = {IMAGE: state.stats.image, PIXEL: state.stats.pixel}
    # Increments of the five counter pairs, in their layout order: num_values (image,
    # pixel), num_nonfinite (image, pixel), rejected. Added as one vector, with the carry.
    inc = [jnp.uint32(0)] * 5
    for which, _, batch_stats, n_bad, n in parts:
        if not which:  # an F1 threshold's scores: no statistic
            continue
        folded = stats[which[0]].merge(batch_stats)
        for w in which:
            i = _WHICH[w]
            stats[w] = keep(folded, stats[w])
            inc[i] = inc[i] + jnp.where(ok, n, jnp.uint32(0))
            if omit:
                inc[2 + i] = inc[2 + i] + n_bad
    c = state.counters
    batch = c[BATCH]
    misc = c[BATCH:]
    if not omit:
        inc[4] = total_bad
        # The first key (in route order) with non-finite values names the batch's error.
        key_id, key_count = jnp.uint32(0), jnp.uint32(0)
        for _, key, _, n_bad, _ in reversed(parts):
            key_id = jnp.where(n_bad > 0, jnp.uint32(KEYS.index(key) + 1), key_id)
            key_count = jnp.where(n_bad > 0, n_bad, key_count)
        new_error = ~ok & (c[BAD_KEY] == 0)
        misc = jnp.where(new_error, jnp.stack([batch, key_id, batch, key_count]), misc)
    inc = jnp.stack(inc)
    pairs = c[:BATCH].reshape(5, 2)
    low = pairs[:, 1] + inc
    high = pairs[:, 0] + (low < inc).astype(jnp.uint32)
    # Not misc.at[0].set: jax before 0.7 has no sharding rule for a scatter over an
    # explicitly sharded mesh, where a state folded with such values lives.
    misc = jnp.concatenate([(batch + 1)[None], misc[1:]])
    c = jnp.concatenate([jnp.stack([high, low], axis=1).reshape(-1), misc])

    new = NormalizationStats(image=stats[IMAGE], pixel=stats[PIXEL])
    return HookState(stats=new, counters=c, f1=tuple(f1)), tuple(chunks)
