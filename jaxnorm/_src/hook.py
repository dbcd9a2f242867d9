"""``MinMaxNormalizationHook``: anomalib's callback lifecycle for a hand-written Flax loop."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np

from jaxnorm._src import batching, errors, hook_step, persistence, placement, ragged, validation
from jaxnorm._src.minmax import MinMax
from jaxnorm._src.outputs import (
    IMAGE,
    NORMALIZED_KEYS,
    PIXEL,
    NormalizationStats,
    StatsMode,
    check_stats_mode,
    stats_sources,
)

NonFinitePolicy = Literal["raise", "omit"]
# (mins, maxs, counts) -> the same, reduced over every participant: min, max and sum.
# mins/maxs are float32 [image, pixel]; counts int64 [n_values, n_nonfinite].
Reducer = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


class MinMaxNormalizationHook:
    """Min-max normalization in a Flax training loop, with anomalib's hooks and keys.

    Call the hooks where Lightning would call the callback's; outputs are dicts of jax (or
    numpy) arrays with anomalib's keys: ``anomaly_maps``, ``box_scores`` (a list with one 1-D
    array per image) and ``pred_scores``. Other keys pass through untouched.

    Example::

      hook = jaxnorm.MinMaxNormalizationHook()
      for epoch in range(epochs):
          ...train...
          hook.on_validation_epoch_start()
          for batch in val_loader:
              hook.on_validation_batch_end(eval_step(state, batch))
          hook.on_validation_epoch_end()
      hook.image_threshold = adaptive_threshold        # raw-score units
      hook.on_test_start()
      for batch in test_loader:
          outputs = hook.on_test_batch_end(eval_step(state, batch))   # scores in [0, 1]

    The hook is plain Python and is never traced; the per-batch work is one jitted call per
    batch, on state that stays on the device, and no per-batch hook reads anything back to
    the host (``box_scores`` aside, which are concatenated and split there). Batch sizes
    that vary are bucketed (see ``jaxnorm._src.batching``), so they compile O(log n) times.

    To fold statistics inside your own jitted step instead, use ``jaxnorm.update_stats``
    there and hand the result over with ``hook.set_stats``.

    Args:
      image_threshold: raw-score threshold for ``pred_scores`` (anomalib's
        ``image_threshold.value``; default 0.5 like its ``AnomalyScoreThreshold``).
      pixel_threshold: raw-score threshold for ``anomaly_maps`` and ``box_scores``.
      stats: ``"shared"`` (default, as anomalib 0.x: one min/max from maps, else boxes, else
        scores) or ``"separate"`` (image statistics from ``pred_scores``, pixel statistics
        from maps or boxes, as anomalib >= 1.1.1).
      accumulate: keep the statistics across validation epochs, sanity check included, as
        anomalib 0.x did. The default resets them at each validation epoch start.
      nonfinite: ``"raise"`` (default): a batch with NaN/inf scores is not folded in
        (decided on the device, so the batch hook does not wait for the outputs), and
        ``NonFiniteScoresError`` naming the key, the count and the batch is raised by
        ``on_validation_epoch_end``, or earlier by the first call that reads the state on the
        host (see ``on_validation_batch_end``). ``"omit"``: non-finite values are skipped
        (and counted in ``num_nonfinite``).
      reducer: how ``on_validation_epoch_end`` combines the statistics of several processes.
        ``"auto"`` (default) all-reduces across JAX processes when ``jax.process_count() > 1``;
        ``None`` never reduces; a callable (see ``Reducer``) is used as given. With a reducer,
        a non-finite error is raised at epoch end on every process at once, so no process
        waits forever in the collective (only the processes that saw the values can name the
        key). ``num_values`` and ``num_nonfinite`` stay per process.
    """

    def __init__(
        self,
        image_threshold: float = 0.5,
        pixel_threshold: float = 0.5,
        *,
        stats: StatsMode = "shared",
        accumulate: bool = False,
        nonfinite: NonFinitePolicy = "raise",
        reducer: Reducer | Literal["auto"] | None = "auto",
    ) -> None:
        if nonfinite not in ("raise", "omit"):
            raise ValueError(f"nonfinite={nonfinite!r}: expected 'raise' or 'omit'.")
        self.stats_mode: StatsMode = check_stats_mode(stats)
        self.accumulate = accumulate
        self.nonfinite: NonFinitePolicy = nonfinite
        self.reducer = reducer
        self._thresholds: dict[str, float] = {}
        # The state the last fold returned, and the placement it was folded at.
        self._folded: hook_step.HookState | None = None
        self._folded_at: jax.sharding.Sharding | None = None
        self._invalidate()
        self._buckets = batching.Buckets()
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.reset()

    # -- options ---------------------------------------------------------------------------

    @property
    def accumulate(self) -> bool:
        return self._accumulate

    @accumulate.setter
    def accumulate(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(
                f"accumulate={value!r}: expected True or False (a {type(value).__name__} "
                "is not read as a flag)."
            )
        self._accumulate = bool(value)

    @property
    def reducer(self) -> Reducer | Literal["auto"] | None:
        return self._reducer

    @reducer.setter
    def reducer(self, value: Reducer | Literal["auto"] | None) -> None:
        if not (value is None or value == "auto" or _is_function(value)):
            raise ValueError(
                f"reducer={value!r}: expected 'auto', None or a callable "
                "(mins, maxs, counts) -> (mins, maxs, counts), see jaxnorm.Reducer."
            )
        self._reducer = value

    # -- thresholds ------------------------------------------------------------------------

    @property
    def image_threshold(self) -> float:
        return self._thresholds[IMAGE]

    @image_threshold.setter
    def image_threshold(self, value) -> None:
        self._set_threshold(IMAGE, value)

    @property
    def pixel_threshold(self) -> float:
        return self._thresholds[PIXEL]

    @pixel_threshold.setter
    def pixel_threshold(self, value) -> None:
        self._set_threshold(PIXEL, value)

    def _set_threshold(self, which: str, value) -> None:
        self._thresholds[which] = persistence.check_threshold(f"{which}_threshold", value)
        self._invalidate()

    # -- statistics ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets all statistics and counters."""
        self._set_state(hook_step.HookState.initial())
        self._host = _EMPTY_HOST

    @property
    def stats(self) -> NormalizationStats:
        """The current statistics (a pytree of device scalars: jit it, save it, reduce it).

        Reading it does not wait for validation batches still in flight.
        """
        return self._state.stats

    def set_stats(self, stats: NormalizationStats | MinMax) -> None:
        """Replaces the statistics, e.g. with ones folded in your own jitted step or loaded.

        A single ``MinMax`` sets both image and pixel statistics. They are read on the host
        and checked: a non-finite value (other than the empty pair ``+inf``/``-inf``), a
        stacked state or ``max < min`` raises ``ValueError``. Image and pixel statistics that
        differ (from ``update_stats(..., mode="separate")``) make a shared hook separate, as
        ``load_json`` does with separate metadata: a shared hook keeps one pair.
        """
        if isinstance(stats, MinMax):
            stats = NormalizationStats(image=stats, pixel=stats)
        if not isinstance(stats, NormalizationStats):
            raise ValueError(
                f"stats: expected NormalizationStats or MinMax, got {type(stats).__name__}."
            )
        host = persistence.checked_stats("set_stats", persistence.host_pairs(stats))
        self._install(host)
        persistence.separate_if_differ(self, host)

    def _install(self, host: Mapping[str, tuple[float, float]]) -> None:
        """Puts checked host statistics on the device (one transfer) and caches them."""
        leaves = jax.device_put([np.float32(v) for which in (IMAGE, PIXEL) for v in host[which]])
        stats = NormalizationStats(
            image=MinMax(min=leaves[0], max=leaves[1]), pixel=MinMax(min=leaves[2], max=leaves[3])
        )
        self._state = self._state.replace(stats=stats)
        self._host = dict(host)
        self._invalidate()

    def _invalidate(self) -> None:
        """The thresholds or statistics changed: their device copy and checks are stale."""
        self._params: jax.Array | None = None
        self._checked: set[str] = set()

    def _set_state(self, state: hook_step.HookState) -> None:
        self._state = state
        self._host: dict[str, tuple[float, float]] | None = None
        self._unchecked = False  # batches folded under "raise" whose record was not read
        self._invalidate()

    @property
    def num_values(self) -> dict[str, int]:
        """Values folded into each statistic since the last reset (reads the device)."""
        self._raise_pending()
        return hook_step.Record(self._state.counters).num_values

    @property
    def num_nonfinite(self) -> dict[str, int]:
        """Non-finite values skipped under ``nonfinite="omit"`` since the last reset."""
        self._raise_pending()
        return hook_step.Record(self._state.counters).num_nonfinite

    def host_stats(self) -> dict[str, tuple[float, float]]:
        """``{"image": (min, max), "pixel": (min, max)}`` as Python floats (one host sync).

        Raises:
          NonFiniteScoresError: a validation batch since the last read held non-finite
            scores under ``nonfinite="raise"`` (see ``on_validation_batch_end``).
        """
        self._raise_pending()
        return self._read_stats()

    def _read_stats(self) -> dict[str, tuple[float, float]]:
        if self._host is None:
            s = self._state.stats
            lo_hi = jax.device_get(((s.image.min, s.image.max), (s.pixel.min, s.pixel.max)))
            (ilo, ihi), (plo, phi) = lo_hi
            self._host = {IMAGE: (float(ilo), float(ihi)), PIXEL: (float(plo), float(phi))}
        return self._host

    def _raise_pending(self) -> None:
        """Reads the error record of the batches folded since the last read (one sync), and
        raises ``NonFiniteScoresError`` for the first rejected one."""
        if not self._unchecked:
            return
        self._unchecked = False
        record = hook_step.Record(self._state.counters)
        if record.bad_key is None:
            return
        self._state = self._state.with_counters(record.reported())
        raise errors.NonFiniteScoresError(
            record.bad_key,
            record.bad_count,
            f" (validation batch {record.bad_batch} of this epoch)",
        )

    # -- validation ------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        """Resets the statistics, unless ``accumulate=True``.

        Raises:
          NonFiniteScoresError: a batch of the previous epoch held non-finite scores under
            ``nonfinite="raise"`` and was not reported yet (``on_validation_epoch_end`` was
            not called).
        """
        self._raise_pending()
        if not self.accumulate:
            self.reset()
        else:
            record = hook_step.Record(self._state.counters)
            self._state = self._state.with_counters(record.new_epoch())

    def on_validation_batch_end(
        self, outputs: Mapping, *, valid_rows: int | None = None
    ) -> Mapping:
        """Folds one batch of validation outputs into the statistics; returns them unchanged.

        One jitted dispatch folds every statistic the batch feeds and counts its non-finite
        values, and nothing is read back to the host: the call returns while the outputs
        are still being computed. Under ``nonfinite="raise"`` a batch with any non-finite
        value is not folded in (decided on the device), and ``NonFiniteScoresError`` (key,
        count and batch index) is raised later: by ``on_validation_epoch_end`` at the latest,
        or earlier by whatever reads the state on the host first (``host_stats``,
        ``state_dict``, ``num_values``, ``on_test_start``, ``normalize_batch``, the next
        ``on_validation_epoch_start``).

        ``box_scores`` are concatenated on the host, so a batch with them waits for them.
        A batch of a new leading size is padded as ``jaxnorm._src.batching`` describes.

        Args:
          outputs: a dict (or mapping) of model outputs.
          valid_rows: when the caller has already padded ``pred_scores`` and
            ``anomaly_maps`` along their leading axis (e.g. to ``batching.bucket(n)``),
            the true number of rows ``n``: the rows beyond are ignored.

        Raises:
          ValueError: with anomalib's message when no known key is present, or naming the key
            whose value is not a numeric array.
        """
        routes = tuple(stats_sources(outputs, self.stats_mode))
        values, rows = {}, {}
        for _, key in routes:
            if key == "box_scores":
                padded, lengths = ragged.concat_padded(ragged.check_boxes(key, outputs[key]))
                values[key], rows[key] = padded, np.int32(sum(lengths))
                continue
            x = validation.as_array(key, outputs[key])
            if valid_rows is not None:
                values[key], rows[key] = x, np.int32(_check_rows(key, x, valid_rows))
                continue
            values[key], n = self._buckets.pad(batching.VALIDATION, key, x, sized=True)
            if n is not None:
                rows[key] = np.int32(n)
        self._fold(values, rows, routes)
        return outputs

    def _fold(self, values: dict, rows: dict, routes: tuple) -> None:
        """One jitted fold of ``values`` (checked arrays, by key) along ``routes``."""
        # A fresh or reloaded state is placed where the fold puts its output, so that the
        # fold compiles once (see placement); the state the last fold returned is there.
        state, target = self._state, placement.target(values.values())
        if target is not None and not (state is self._folded and target == self._folded_at):
            state = placement.place(state, target)
        self._state = hook_step.fold(
            state, values, rows, routes=routes, omit=self.nonfinite == "omit"
        )
        self._folded, self._folded_at = self._state, target
        self._host = None
        self._invalidate()
        self._unchecked = self.nonfinite == "raise"

    def on_validation_epoch_end(self) -> None:
        """Reports non-finite scores, and reduces the statistics across processes when a
        reducer is active.

        Without a reducer, under ``nonfinite="omit"``, this reads nothing from the device.

        Raises:
          NonFiniteScoresError: a batch of this epoch held non-finite scores under
            ``nonfinite="raise"`` (and was not reported earlier). With a reducer, on every
            process when any process saw them.
        """
        reducer = self._active_reducer()
        if reducer is None:
            self._raise_pending()
            return
        state = self._state
        s = state.stats
        mins, maxs, counters = jax.device_get(
            ((s.image.min, s.pixel.min), (s.image.max, s.pixel.max), state.counters)
        )
        record = hook_step.Record(counters)
        counts = np.array([record.num_values[IMAGE], record.rejected], np.int64)
        mins, maxs, counts = _reduced(
            reducer(np.asarray(mins, np.float32), np.asarray(maxs, np.float32), counts)
        )
        self._unchecked = False
        self._state = state.with_counters(record.new_epoch())
        self._install(
            persistence.checked_stats(
                "reducer output", {IMAGE: (mins[0], maxs[0]), PIXEL: (mins[1], maxs[1])}
            )
        )
        n_bad = int(counts[1])
        if n_bad:
            key = record.bad_key or "validation outputs"
            raise errors.NonFiniteScoresError(key, n_bad, " (summed over all processes)")

    def _active_reducer(self) -> Reducer | None:
        if self.reducer == "auto":
            if jax.process_count() > 1:
                from jaxnorm._src.distributed import allreduce_across_processes

                return allreduce_across_processes
            return None
        return self.reducer

    # -- test and predict ------------------------------------------------------------------

    def on_test_start(self) -> None:
        """Fails early, before the first test batch, when no statistics are there at all.

        Each batch checks the statistics its keys need (with separate statistics, a model
        without maps needs no pixel statistics).
        """
        stats = self.host_stats()
        if all(lo > hi for lo, hi in stats.values()):
            self._check_stats(["pred_scores"])

    def on_test_batch_end(self, outputs: Mapping) -> dict:
        """Returns a copy of ``outputs`` with scores, maps and boxes normalized to [0, 1]."""
        return self.normalize_batch(outputs)

    def on_predict_batch_end(self, outputs: Mapping) -> dict:
        """Same as ``on_test_batch_end``: predictions come back normalized."""
        return self.normalize_batch(outputs)

    def normalize_batch(
        self,
        outputs: Mapping,
        *,
        boxes_on_host: bool = False,
        valid_rows: int | None = None,
    ) -> dict:
        """Normalizes ``pred_scores`` with the image threshold and statistics, and
        ``anomaly_maps`` and each array of ``box_scores`` with the pixel ones.

        Every present key is normalized in one jitted dispatch, with the thresholds and
        statistics already on the device; nothing is read back to the host (after the first
        batch, which reads the statistics once to check them), except ``box_scores``, which
        are concatenated and split on the host.

        Args:
          outputs: a dict of model outputs.
          boxes_on_host: return ``box_scores`` as numpy arrays. They are split on the host
            anyway; this skips one device transfer per image (the Lightning shim wraps them
            as tensors directly).
          valid_rows: when the caller has already padded ``pred_scores`` and
            ``anomaly_maps`` along their leading axis (e.g. to ``batching.bucket(n)``), the
            true number of rows. They then come back padded as given (rows beyond
            ``valid_rows`` hold normalized padding): slice them, e.g. as torch views.

        Raises:
          ValueError: none of the three keys is present (anomalib's message), or a value is
            not numeric.
          StatisticsMissingError: no statistics were collected or loaded.
          NonFiniteScoresError: a validation batch held non-finite scores under
            ``nonfinite="raise"`` and was not reported yet.
        """
        present = [key for key in NORMALIZED_KEYS if key in outputs]
        if not present:
            raise ValueError(errors.NO_VALUES_MESSAGE)
        self._check_stats(present)
        values, unpad, lengths = {}, {}, None
        for key in present:
            if key == "box_scores":
                boxes = ragged.check_boxes(key, outputs[key])
                values[key], lengths = ragged.concat_padded(boxes)
                continue
            x = validation.as_array(key, outputs[key])
            if valid_rows is not None:
                _check_rows(key, x, valid_rows)
                values[key] = x
                continue
            values[key], n = self._buckets.pad(batching.NORMALIZE, key, x)
            if n is not None:
                unpad[key] = n
        normalized = hook_step.normalize_all(values, self._device_params())
        out = dict(outputs)
        for key in present:
            y = normalized[key]
            if key == "box_scores":
                out[key] = (
                    ragged.split_host(y, lengths, outputs[key])
                    if boxes_on_host
                    else ragged.split(y, lengths, outputs[key])
                )
            elif key in unpad:
                out[key] = batching.unpad(y, unpad[key], outputs[key])
            else:
                out[key] = y
        return out

    def _device_params(self) -> jax.Array:
        """``[[t, min, max] image, [t, min, max] pixel]`` on the device, made once per change."""
        if self._params is None:
            stats = self._read_stats()
            dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
            self._params = jax.device_put(
                np.array([[self._thresholds[w], *stats[w]] for w in (IMAGE, PIXEL)], dtype)
            )
        return self._params

    def _omitted(self, which: str) -> int:
        """How many non-finite scores validation left out of the ``which`` statistics (the
        shared ones are counted under both names); read on the host, on the error path only."""
        return hook_step.Record(self._state.counters).num_nonfinite[which]

    def _check_stats(self, keys) -> None:
        self._raise_pending()
        needed = {NORMALIZED_KEYS[k] for k in keys}
        if needed <= self._checked:
            return
        stats = self._read_stats()
        for which in sorted(needed):
            lo, hi = stats[which]
            if lo > hi:
                label = "" if self.stats_mode == "shared" else f"{which} "
                source = "'pred_scores'" if which == IMAGE else "'anomaly_maps' or 'box_scores'"
                seen = (
                    " (validation outputs had no " + source + ")"
                    if self.stats_mode == "separate"
                    else ""
                )
                omitted = self._omitted(which)
                if omitted:
                    raise errors.StatisticsMissingError(
                        f"no {label}normalization statistics: validation ran, but all "
                        f"{omitted} of its scores were NaN or infinite and "
                        "nonfinite='omit' left them out; fix the model's outputs (or load "
                        "statistics with load_state_dict, load_json, set_stats) before test "
                        "or predict; normalizing now would turn every score into 0.5."
                    )
                raise errors.StatisticsMissingError(
                    f"no {label}normalization statistics{seen}: run validation "
                    "(on_validation_batch_end) or load statistics (load_state_dict, "
                    "load_json, set_stats) before test or predict; normalizing now would "
                    "turn every score into 0.5."
                )
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(
                    f"{which} statistics ({lo}, {hi}) are not finite (scores beyond float32's "
                    "range were folded in); rescale the scores and validate again."
                )
            self._checked.add(which)

    # -- saving and loading (jaxnorm._src.persistence) -----------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The hook's state as a pytree of arrays (``flax.serialization``/orbax friendly).

        Thresholds are float64 (exact), the counters uint64, so that a resumed run goes on
        as an uninterrupted one would.
        """
        return persistence.state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()`` output, also as the plain dicts that msgpack returns.

        The statistics are checked like ``set_stats``'s (image and pixel statistics that
        differ make a shared hook separate, as there); counters are optional (a state saved
        without them restores zeros).
        """
        persistence.load_state_dict(self, state)

    def metadata(self) -> dict[str, float | None]:
        """anomalib's deployment metadata: thresholds and statistics in raw-score units.

        Shared statistics use anomalib 0.x's keys (``image_threshold``, ``pixel_threshold``,
        ``min``, ``max``), which its inferencers read. Separate statistics use
        ``pred_scores.min``/``.max`` and ``anomaly_maps.min``/``.max``. Empty statistics are
        ``None`` (JSON ``null``).
        """
        return persistence.metadata(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """``metadata()`` as JSON; written to ``path`` when given."""
        return persistence.to_json(self, path)

    def load_json(self, source: str | os.PathLike | Mapping) -> None:
        """Loads thresholds and statistics from ``to_json`` output or anomalib metadata.

        Args:
          source: a path to a JSON file, a JSON string, or an already parsed dict.

        Raises:
          ValueError: the JSON is not an object, has no statistics keys, or holds statistics
            that are not finite numbers with ``min <= max`` (``null`` for both means none),
            naming the key.
        """
        persistence.load_json(self, source)

    @classmethod
    def from_json(cls, source: str | os.PathLike | Mapping, **kwargs) -> MinMaxNormalizationHook:
        """A hook with thresholds and statistics from ``to_json`` output or anomalib metadata."""
        hook = cls(**kwargs)
        hook.load_json(source)
        return hook

    def __getstate__(self) -> dict:
        # Copies and pickles drop the placement cache of ``_fold``: jax's devices do not
        # pickle, and a copy places its state again at its first fold.
        state = self.__dict__.copy()
        state["_folded"] = state["_folded_at"] = None
        return state

    def __repr__(self) -> str:
        # Not host_stats(): a repr (a debugger, a log line) must neither raise nor consume
        # the pending non-finite error that on_validation_epoch_end is to raise.
        stats = self._read_stats()
        (ilo, ihi), (plo, phi) = stats[IMAGE], stats[PIXEL]
        return (
            f"MinMaxNormalizationHook(image_threshold={self.image_threshold:g}, "
            f"pixel_threshold={self.pixel_threshold:g}, stats={self.stats_mode!r}, "
            f"image=[{ilo:g}, {ihi:g}], pixel=[{plo:g}, {phi:g}])"
        )


_EMPTY_HOST = {IMAGE: (math.inf, -math.inf), PIXEL: (math.inf, -math.inf)}


def _reduced(out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reducer's output, checked: three arrays of two values each."""
    try:
        mins, maxs, counts = (np.asarray(a) for a in out)
        ok = mins.shape == maxs.shape == counts.shape == (2,) and counts.dtype.kind in "iuf"
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"reducer returned {out!r}; expected (mins, maxs, counts) like its arguments: "
            "float arrays [image, pixel] reduced with min and max, and the integer counts "
            "[n_values, n_nonfinite] summed (see jaxnorm.Reducer)."
        )
    return mins, maxs, counts


def _is_function(value) -> bool:
    return callable(value) and not isinstance(value, str)


def _check_rows(key: str, x, valid_rows: int) -> int:
    if isinstance(valid_rows, bool) or not isinstance(valid_rows, (int, np.integer)):
        raise ValueError(f"valid_rows={valid_rows!r}: expected an int.")
    if np.ndim(x) == 0 or not 0 <= valid_rows <= x.shape[0]:
        raise ValueError(
            f"{key}: valid_rows={valid_rows} does not fit its shape {tuple(np.shape(x))}; "
            "pass the number of real rows of the padded leading axis."
        )
    return int(valid_rows)
