"""``MinMaxNormalizationHook``: anomalib's callback lifecycle for a hand-written Flax loop.

The hook holds the lifecycle (validation epochs, test and predict) and the options. Its state
on the device and the caches that keep per-batch work to one jitted dispatch are in
``device_state``; the work itself in ``fold`` (validation) and ``fused`` (test and predict);
saving and loading in ``persistence``. The Lightning adapters (``torch_compat``) drive it
through its public API and ``hook.adapter`` (``jaxnorm._src.adapter``), nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import jax

from jaxnorm._src import (
    adapter,
    batching,
    device_state,
    f1_epoch,
    persistence,
    validation,
)
from jaxnorm._src.minmax import MinMax
from jaxnorm._src.stats import (
    IMAGE,
    PIXEL,
    NormalizationStats,
    mode_after_load,
    stats_sources,
)
from jaxnorm._src.validation import NonFinitePolicy, Reducer, StatsMode

__all__ = ["MinMaxNormalizationHook", "NonFinitePolicy", "Reducer"]


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
      thresholds: ``"f1"``: anomalib's F1 adaptive thresholds, computed from each epoch's
        ``pred_scores`` with ``label`` (every batch) and ``anomaly_maps`` with ``mask`` (else
        the pixel one is the image one), as anomalib 0.x does; set by
        ``on_validation_epoch_end`` (see docs/thresholds.md). ``None`` (default): set them.
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
        thresholds: Literal["f1"] | None = None,
        reducer: Reducer | Literal["auto"] | None = "auto",
    ) -> None:
        self.nonfinite: NonFinitePolicy = validation.check_nonfinite(nonfinite)
        self.thresholds = thresholds
        self.stats_mode: StatsMode = validation.check_stats_mode(stats)
        self.accumulate = accumulate
        self.reducer = reducer
        self._thresholds: dict[str, float] = {}
        self._device = device_state.DeviceState()
        self._buckets = batching.Buckets()
        # What the Lightning adapters use beyond the public API (see jaxnorm._src.adapter).
        self.adapter = adapter.HookAdapter(self, self._device, self._buckets, self._thresholds)
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold

    # -- options ---------------------------------------------------------------------------

    @property
    def accumulate(self) -> bool:
        return self._accumulate

    @accumulate.setter
    def accumulate(self, value: bool) -> None:
        self._accumulate = validation.check_flag("accumulate", value)

    @property
    def thresholds(self) -> Literal["f1"] | None:
        return self._threshold_mode

    @thresholds.setter
    def thresholds(self, value: Literal["f1"] | None) -> None:
        self._threshold_mode = f1_epoch.check_mode(value)

    @property
    def reducer(self) -> Reducer | Literal["auto"] | None:
        return self._reducer

    @reducer.setter
    def reducer(self, value: Reducer | Literal["auto"] | None) -> None:
        self._reducer = validation.check_reducer(value)

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
        self._thresholds[which] = validation.check_threshold(f"{which}_threshold", value)
        self._device.invalidate()

    # -- statistics ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets all statistics and counters."""
        self._device.reset()

    @property
    def stats(self) -> NormalizationStats:
        """The current statistics (a pytree of device scalars: jit it, save it, reduce it).

        Reading it does not wait for validation batches still in flight. It is a new object
        whenever the statistics change (a fold, a load, a reset), and the same object while
        they do not.
        """
        return self._device.stats

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
        self._install(validation.checked_stats("set_stats", persistence.host_pairs(stats)))

    def _install(self, host: Mapping[str, tuple[float, float]]) -> None:
        self._device.install(host)
        self.stats_mode = mode_after_load(self.stats_mode, host)

    @property
    def num_values(self) -> dict[str, int]:
        """Values folded into each statistic since the last reset (reads the device)."""
        self._device.raise_pending()
        return self._device.record().num_values

    @property
    def num_nonfinite(self) -> dict[str, int]:
        """Non-finite values skipped under ``nonfinite="omit"`` since the last reset."""
        self._device.raise_pending()
        return self._device.record().num_nonfinite

    def host_stats(self) -> dict[str, tuple[float, float]]:
        """``{"image": (min, max), "pixel": (min, max)}`` as Python floats (one host sync).

        Raises:
          NonFiniteScoresError: a validation batch since the last read held non-finite
            scores under ``nonfinite="raise"`` (see ``on_validation_batch_end``).
        """
        self._device.raise_pending()
        return self._device.read()

    # -- validation ------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        """Resets the statistics, unless ``accumulate=True``.

        Raises:
          NonFiniteScoresError: a batch of the previous epoch held non-finite scores under
            ``nonfinite="raise"`` and was not reported yet (``on_validation_epoch_end`` was
            not called).
        """
        self._device.raise_pending()
        if not self.accumulate:
            self.reset()
        else:
            self._device.new_epoch()

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
            whose value is not a numeric array; with ``thresholds="f1"``, naming a missing
            ``label`` or ``pred_scores``, or labels that are not one per score.
        """
        routes = tuple(stats_sources(outputs, self.stats_mode))
        f1 = f1_epoch.hook_routes(outputs, self._device.f1) if self.thresholds else ()
        self.adapter.fold_outputs(outputs, routes, f1, valid_rows)
        return outputs

    def on_validation_epoch_end(self) -> None:
        """Reports non-finite scores, reduces the statistics across processes when a reducer
        is active, and with ``thresholds="f1"`` sets the thresholds (raw units) of the clean
        batches. Without either, under ``nonfinite="omit"``, it reads nothing from the device.

        Raises:
          NonFiniteScoresError: a batch of this epoch held non-finite scores under
            ``nonfinite="raise"`` (and was not reported earlier). With a reducer, on every
            process when any process saw them.
          ValueError: with ``thresholds="f1"``, labels other than 0 and 1, naming the key.
        """
        reducer = self._active_reducer()
        error = self._device.end_epoch(reducer)  # raised once the thresholds are set
        if self.thresholds:
            f1_epoch.set_hook_thresholds(self, self.adapter.f1_result(reducer))
        if error is not None:
            raise error

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
        if all(lo > hi for lo, hi in self.host_stats().values()):
            self._device.check(["pred_scores"], shared=self.stats_mode == "shared")

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
        return self.adapter.normalize_batch(
            outputs, boxes_on_host=boxes_on_host, valid_rows=valid_rows
        )

    def _snapshot(self, *, counts: bool = True) -> persistence.Snapshot:
        # Metadata holds no counters: reading them would cost a sync and raise nothing more.
        return persistence.Snapshot(
            self.host_stats(),
            dict(self._thresholds),
            self.stats_mode,
            *((self.num_values, self.num_nonfinite) if counts else ()),
        )

    def _load(self, snap: persistence.Snapshot) -> None:
        self._install(snap.stats)
        for which, value in snap.thresholds.items():
            self._set_threshold(which, value)
        if snap.stats_mode is not None:
            self.stats_mode = snap.stats_mode

    def state_dict(self) -> dict[str, Any]:
        """The hook's state as a pytree of arrays (``flax.serialization``/orbax friendly).

        Thresholds are float64 (exact), the counters uint64, so that a resumed run goes on
        as an uninterrupted one would.
        """
        return persistence.to_state_dict(self._snapshot(), self.stats)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()`` output, also as the plain dicts that msgpack returns.

        The statistics are checked like ``set_stats``'s (image and pixel statistics that
        differ make a shared hook separate, as there); counters are optional (a state saved
        without them restores zeros).
        """
        snap = persistence.from_state_dict(state)  # checked: a bad state changes nothing
        self._device.restore(snap.num_values, snap.num_nonfinite)
        self._load(snap)

    def metadata(self) -> dict[str, float | None]:
        """anomalib's deployment metadata: thresholds and statistics in raw-score units.

        Shared statistics use anomalib 0.x's keys (``image_threshold``, ``pixel_threshold``,
        ``min``, ``max``), which its inferencers read. Separate statistics use
        ``pred_scores.min``/``.max`` and ``anomaly_maps.min``/``.max``. Empty statistics are
        ``None`` (JSON ``null``).
        """
        return persistence.to_metadata(self._snapshot(counts=False))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """``metadata()`` as JSON; written to ``path`` when given."""
        return persistence.to_json(self._snapshot(counts=False), path)

    def load_json(self, source: str | os.PathLike | Mapping) -> None:
        """Loads thresholds and statistics from ``to_json`` output or anomalib metadata.

        Args:
          source: a path to a JSON file, a JSON string, or an already parsed dict.

        Raises:
          ValueError: the JSON is not an object, has no statistics keys, or holds statistics
            that are not finite numbers with ``min <= max`` (``null`` for both means none),
            naming the key.
        """
        self._load(persistence.from_json(source))  # checked: a bad source changes nothing

    @classmethod
    def from_json(cls, source: str | os.PathLike | Mapping, **kwargs) -> MinMaxNormalizationHook:
        """A hook with thresholds and statistics from ``to_json`` output or anomalib metadata."""
        hook = cls(**kwargs)
        hook.load_json(source)
        return hook

    def __repr__(self) -> str:
        # Not host_stats(): a repr (a debugger, a log line) must neither raise nor consume
        # the pending non-finite error that on_validation_epoch_end is to raise.
        stats = self._device.read()
        (ilo, ihi), (plo, phi) = stats[IMAGE], stats[PIXEL]
        return (
            f"MinMaxNormalizationHook(image_threshold={self.image_threshold:g}, "
            f"pixel_threshold={self.pixel_threshold:g}, stats={self.stats_mode!r}, "
            f"image=[{ilo:g}, {ihi:g}], pixel=[{plo:g}, {phi:g}])"
        )
