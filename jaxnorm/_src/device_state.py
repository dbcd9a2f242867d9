"""What the hook holds on the device, and the host copies and checks it caches.

``DeviceState`` owns the hook's ``fold.HookState`` and every cache derived from it: the
statistics read on the host, which statistics were checked, the packed parameters of the
test call, whether an error record is still unread, and where the state was last folded.
Each cache is dropped by every method that changes what it was made from (``fold``,
``install``, ``reset``, ``restore``, and ``invalidate`` for a threshold), so a hit is valid
by construction; copies and pickles drop the placement cache (devices do not pickle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxnorm._src import errors, f1_epoch, fold, placement, validation
from jaxnorm._src.minmax import MinMax
from jaxnorm._src.stats import IMAGE, NORMALIZED_KEYS, PIXEL, NormalizationStats
from jaxnorm._src.validation import Reducer

_EMPTY_HOST = {IMAGE: (math.inf, -math.inf), PIXEL: (math.inf, -math.inf)}


class DeviceState:
    """The hook's validation state on the device, and what it caches about it."""

    def __init__(self) -> None:
        # The state the last fold returned, and the placement it was folded at.
        self._folded: fold.HookState | None = None
        self._folded_at: jax.sharding.Sharding | None = None
        self.reset()

    def _set(self, state: fold.HookState, host: Mapping | None) -> None:
        self._state = state
        self.f1 = f1_epoch.EpochF1()  # the F1 thresholds' chunks: reset with the state
        self._host: dict[str, tuple[float, float]] | None = None if host is None else dict(host)
        self.unchecked = False  # batches folded under "raise" whose record was not read
        self.invalidate()

    def invalidate(self) -> None:
        """The thresholds or statistics changed: their device copy and checks are stale."""
        self._params: jax.Array | None = None
        self._checked: set[str] = set()

    def reset(self) -> None:
        """Empty statistics, zero counters."""
        self._set(fold.HookState.initial(), _EMPTY_HOST)

    def restore(self, num_values: Mapping | None, num_nonfinite: Mapping | None) -> None:
        """Empty statistics, with the counters given (a loaded state dict's)."""
        self._set(fold.HookState.initial(None, num_values, num_nonfinite), None)

    @property
    def stats(self) -> NormalizationStats:
        return self._state.stats

    @property
    def counters(self) -> jax.Array:
        return self._state.counters

    def install(self, host: Mapping[str, tuple[float, float]]) -> None:
        """Puts checked host statistics on the device (one transfer) and caches them."""
        leaves = jax.device_put([np.float32(v) for which in (IMAGE, PIXEL) for v in host[which]])
        stats = NormalizationStats(
            image=MinMax(min=leaves[0], max=leaves[1]), pixel=MinMax(min=leaves[2], max=leaves[3])
        )
        self._state = self._state.replace(stats=stats)
        self._host = dict(host)
        self.invalidate()

    def record(self) -> fold.Record:
        """The counters, read on the host (one sync)."""
        return fold.Record(self._state.counters)

    def read(self) -> dict[str, tuple[float, float]]:
        """The statistics as Python floats (one sync, cached until they change)."""
        if self._host is None:
            s = self._state.stats
            lo_hi = jax.device_get(((s.image.min, s.image.max), (s.pixel.min, s.pixel.max)))
            (ilo, ihi), (plo, phi) = lo_hi
            self._host = {IMAGE: (float(ilo), float(ihi)), PIXEL: (float(plo), float(phi))}
        return self._host

    def raise_pending(self) -> None:
        """Reads the error record of the batches folded since the last read (one sync), and
        raises ``NonFiniteScoresError`` for the first rejected one."""
        if not self.unchecked:
            return
        self.unchecked = False
        record = self.record()
        if record.bad_key is None:
            return
        self._state = self._state.with_counters(record.reported())
        raise errors.NonFiniteScoresError(
            record.bad_key,
            record.bad_count,
            f" (validation batch {record.bad_batch} of this epoch)",
        )

    def new_epoch(self) -> None:
        """Clears this epoch's error record, batch count and F1 thresholds' states;
        statistics stay (anomalib 0.x's thresholds are computed per epoch, whatever the
        statistics do)."""
        self._state = self._state.with_counters(self.record().new_epoch())
        self.end_f1()

    def fold(
        self, values: Mapping, routes: tuple, rows: Mapping, *, omit: bool, f1_routes=()
    ) -> None:
        """One jitted fold of checked arrays (see ``fold.fold``); no host read."""
        state = self._state
        if f1_routes and not state.f1:
            state = state.replace(f1=f1_epoch.empty_states())
        # A fresh or reloaded state is placed where the fold puts its output, so that the
        # fold compiles once (see placement); the state the last fold returned is there.
        target = placement.target(values.values())
        if target is not None and not (state is self._folded and target == self._folded_at):
            state = placement.place(state, target)
        self._state, chunks = fold.fold(
            state, dict(values), dict(rows), routes=routes, omit=omit, f1_routes=f1_routes
        )
        self.f1.add(f1_routes, chunks)
        self._folded, self._folded_at = self._state, target
        self._host = None
        self.invalidate()
        self.unchecked = not omit

    def f1_result(self, reducer: Reducer | None) -> f1_epoch.Result:
        """The epoch's F1 thresholds (see ``f1_epoch.EpochF1.compute``; a collective with
        ``reducer``); their states are dropped after, as anomalib resets its metrics."""
        try:
            return self.f1.compute(self._state.f1, reducer)
        finally:
            self.end_f1()

    def end_f1(self) -> None:
        """Drops the F1 thresholds' states (and their stored scores); statistics stay."""
        if self._state.f1:
            self._state = self._state.replace(f1=())
        self.f1 = f1_epoch.EpochF1()

    def end_epoch(self, reducer: Reducer | None) -> errors.NonFiniteScoresError | None:
        """The validation epoch's end for the statistics: reduced with ``reducer`` (a
        collective), else the pending record read; the epoch's non-finite error is returned,
        not raised (the caller sets the thresholds of the clean batches first)."""
        try:
            if reducer is None:
                self.raise_pending()
                return None
            bad_key, n_bad = self.reduce(reducer)
        except errors.NonFiniteScoresError as e:
            return e
        if not n_bad:
            return None
        key = bad_key or "validation outputs"
        return errors.NonFiniteScoresError(key, n_bad, " (summed over all processes)")

    def reduce(self, reducer: Reducer) -> tuple[str | None, int]:
        """Reduces the statistics and the rejected count with ``reducer``, installs the
        result and clears the epoch's record; returns ``(bad key, rejected count)``."""
        state = self._state
        s = state.stats
        mins, maxs, counters = jax.device_get(
            ((s.image.min, s.pixel.min), (s.image.max, s.pixel.max), state.counters)
        )
        record = fold.Record(counters)
        counts = np.array([record.num_values[IMAGE], record.rejected], np.int64)
        mins, maxs, counts = validation.check_reduced(
            reducer(np.asarray(mins, np.float32), np.asarray(maxs, np.float32), counts)
        )
        self.unchecked = False
        self._state = state.with_counters(record.new_epoch())
        pairs = {IMAGE: (mins[0], maxs[0]), PIXEL: (mins[1], maxs[1])}
        self.install(validation.checked_stats("reducer output", pairs))
        return record.bad_key, int(counts[1])

    def check(self, keys: Iterable[str], *, shared: bool) -> None:
        """Raises what normalizing ``keys`` must raise first: a pending error, statistics
        missing or not finite. A statistic that passed is not checked again until it
        changes."""
        self.raise_pending()
        needed = {NORMALIZED_KEYS[k] for k in keys}
        if needed <= self._checked:
            return
        stats = self.read()
        for which in sorted(needed):
            lo, hi = stats[which]
            if lo > hi:
                # How many scores "omit" left out: read on the host, on the error path only.
                omitted = self.record().num_nonfinite[which]
                raise errors.statistics_missing(which, shared, omitted)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(
                    f"{which} statistics ({lo}, {hi}) are not finite (scores beyond float32's "
                    "range were folded in); rescale the scores and validate again."
                )
            self._checked.add(which)

    def params(self, thresholds: Mapping[str, float]) -> jax.Array:
        """``[[t, min, max] image, [t, min, max] pixel]`` on the device, made once per change
        (a threshold change calls ``invalidate``)."""
        if self._params is None:
            stats = self.read()
            dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
            self._params = jax.device_put(
                np.array([[thresholds[w], *stats[w]] for w in (IMAGE, PIXEL)], dtype)
            )
        return self._params

    def params_current(self, params: Any) -> bool:
        """Whether ``params`` are the cached parameters and no error record is unread."""
        return params is self._params and not self.unchecked

    def __getstate__(self) -> dict:
        # Copies and pickles drop the placement cache of ``fold``: jax's devices do not
        # pickle, and a copy places its state again at its first fold.
        state = self.__dict__.copy()
        state["_folded"] = state["_folded_at"] = None
        return state
