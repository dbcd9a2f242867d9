"""``MinMaxNormalizationHook``: anomalib's callback lifecycle for a hand-written Flax loop."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import errors, ragged, validation
from jaxnorm._src.minmax import MinMax, _update
from jaxnorm._src.normalize import _device_pack, _normalize_packed
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


@jax.jit
def _fold_prefix(state: MinMax, padded: jax.Array, n: jax.Array):
    """Folds ``padded[:n]``: the mask is built on device, so only len(padded) is static."""
    return _update(state, padded, jnp.arange(padded.shape[0]) < n)


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

    The hook is plain Python and is never traced; the per-batch work runs in jitted
    functions. To fold statistics inside your own jitted step instead, use
    ``jaxnorm.update_stats`` there and hand the result over with ``hook.set_stats``.

    Args:
      image_threshold: raw-score threshold for ``pred_scores`` (anomalib's
        ``image_threshold.value``; default 0.5 like its ``AnomalyScoreThreshold``).
      pixel_threshold: raw-score threshold for ``anomaly_maps`` and ``box_scores``.
      stats: ``"shared"`` (default, as anomalib 0.x: one min/max from maps, else boxes, else
        scores) or ``"separate"`` (image statistics from ``pred_scores``, pixel statistics
        from maps or boxes, as anomalib >= 1.1.1).
      accumulate: keep the statistics across validation epochs, sanity check included, as
        anomalib 0.x did. The default resets them at each validation epoch start.
      nonfinite: ``"raise"`` (default): a batch with NaN/inf scores raises
        ``NonFiniteScoresError`` naming the key and the count, and is not folded in.
        ``"omit"``: non-finite values are skipped (and counted in ``num_nonfinite``).
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
        self.accumulate = bool(accumulate)
        self.nonfinite: NonFinitePolicy = nonfinite
        self.reducer = reducer
        self._thresholds: dict[str, float] = {}
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.reset()

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
        value = validation.host_scalar(f"{which}_threshold", value)
        if not isinstance(value, float):
            raise ValueError(f"{which}_threshold: pass a concrete number, not a traced value.")
        self._thresholds[which] = value

    # -- statistics ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets all statistics and counters."""
        self._set(NormalizationStats.empty())
        self.num_values = {IMAGE: 0, PIXEL: 0}
        self._nonfinite_host = {IMAGE: 0, PIXEL: 0}
        self._nonfinite_device: dict[str, list[jax.Array]] = {IMAGE: [], PIXEL: []}
        self._pending: errors.NonFiniteScoresError | None = None
        self._pending_count = 0
        self._batches = 0

    @property
    def stats(self) -> NormalizationStats:
        """The current statistics (a pytree: jit it, save it, reduce it)."""
        return self._stats

    def set_stats(self, stats: NormalizationStats | MinMax) -> None:
        """Replaces the statistics, e.g. with ones folded in your own jitted step or loaded.

        A single ``MinMax`` sets both image and pixel statistics.
        """
        if isinstance(stats, MinMax):
            stats = NormalizationStats(image=stats, pixel=stats)
        if not isinstance(stats, NormalizationStats):
            raise ValueError(
                f"stats: expected NormalizationStats or MinMax, got {type(stats).__name__}."
            )
        self._set(stats)

    def _set(self, stats: NormalizationStats) -> None:
        self._stats = stats
        self._host: dict[str, tuple[float, float]] | None = None

    def _device_params(self, which: str) -> jax.Array:
        """``[threshold, min, max]`` on the device; cached by value, so made once per change."""
        lo, hi = self.host_stats()[which]
        return _device_pack(self._thresholds[which], lo, hi, bool(jax.config.jax_enable_x64))

    @property
    def num_nonfinite(self) -> dict[str, int]:
        """Non-finite values seen (and skipped) since the last reset, per statistic."""
        for which, pending in self._nonfinite_device.items():
            self._nonfinite_host[which] += sum(int(c) for c in pending)
            pending.clear()
        return dict(self._nonfinite_host)

    def host_stats(self) -> dict[str, tuple[float, float]]:
        """``{"image": (min, max), "pixel": (min, max)}`` as Python floats (one host sync)."""
        if self._host is None:
            lo_hi = jax.device_get(
                (
                    (self._stats.image.min, self._stats.image.max),
                    (self._stats.pixel.min, self._stats.pixel.max),
                )
            )
            self._host = {
                IMAGE: (float(lo_hi[0][0]), float(lo_hi[0][1])),
                PIXEL: (float(lo_hi[1][0]), float(lo_hi[1][1])),
            }
        return self._host

    # -- validation ------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        """Resets the statistics, unless ``accumulate=True``."""
        if not self.accumulate:
            self.reset()
        self._pending, self._pending_count, self._batches = None, 0, 0

    def on_validation_batch_end(self, outputs: Mapping) -> Mapping:
        """Folds one batch of validation outputs into the statistics; returns them unchanged.

        Raises:
          ValueError: with anomalib's message when no known key is present, or naming the key
            whose value is not a numeric array.
          NonFiniteScoresError: under ``nonfinite="raise"`` with no reducer.
        """
        updates = {}
        for which, key in stats_sources(outputs, self.stats_mode):
            state = self._stats.get(which[0])
            if key == "box_scores":
                padded, lengths = ragged.concat_padded(ragged.check_boxes(key, outputs[key]))
                n = sum(lengths)
                new, n_bad = _fold_prefix(state, padded, n)
            else:
                values = validation.as_array(key, outputs[key])
                n = values.size
                new, n_bad = _update(state, values, None)
            updates[key] = (which, new, n_bad, n)

        if self.nonfinite == "raise":
            bad = {key: int(u[2]) for key, u in updates.items()}
            bad = {key: c for key, c in bad.items() if c}
            if bad:
                key, count = next(iter(bad.items()))
                error = errors.NonFiniteScoresError(
                    key, count, f" (validation batch {self._batches} of this epoch)"
                )
                self._batches += 1
                if self._active_reducer() is None:
                    raise error
                self._pending = self._pending or error
                self._pending_count += sum(bad.values())
                return outputs

        image, pixel = self._stats.image, self._stats.pixel
        for which, new, n_bad, n in updates.values():
            for w in which:
                image, pixel = (new, pixel) if w == IMAGE else (image, new)
                self.num_values[w] += n
                if self.nonfinite == "omit":
                    self._nonfinite_device[w].append(n_bad)
        self._set(NormalizationStats(image=image, pixel=pixel))
        self._batches += 1
        return outputs

    def on_validation_epoch_end(self) -> None:
        """Reduces the statistics across processes when a reducer is active.

        Raises:
          NonFiniteScoresError: on every process, when any process saw non-finite scores
            under ``nonfinite="raise"``.
        """
        reducer = self._active_reducer()
        if reducer is None:
            return
        (ilo, ihi), (plo, phi) = self.host_stats()[IMAGE], self.host_stats()[PIXEL]
        n_bad_local = self._pending_count
        mins = np.array([ilo, plo], np.float32)
        maxs = np.array([ihi, phi], np.float32)
        counts = np.array([self.num_values[IMAGE], n_bad_local], np.int64)
        mins, maxs, counts = reducer(mins, maxs, counts)
        stats = NormalizationStats(
            image=MinMax(min=jnp.float32(mins[0]), max=jnp.float32(maxs[0])),
            pixel=MinMax(min=jnp.float32(mins[1]), max=jnp.float32(maxs[1])),
        )
        self._set(stats)
        n_bad = int(counts[1])
        if n_bad:
            key = self._pending.key if self._pending else "validation outputs"
            where = " (summed over all processes)"
            self._pending, self._pending_count = None, 0
            raise errors.NonFiniteScoresError(key, n_bad, where)

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

    def normalize_batch(self, outputs: Mapping, *, boxes_on_host: bool = False) -> dict:
        """Normalizes ``pred_scores`` with the image threshold and statistics, and
        ``anomaly_maps`` and each array of ``box_scores`` with the pixel ones.

        Args:
          outputs: a dict of model outputs.
          boxes_on_host: return ``box_scores`` as numpy arrays. They are split on the host
            anyway; this skips one device transfer per image (the Lightning shim wraps them
            as tensors directly).

        Raises:
          ValueError: none of the three keys is present (anomalib's message), or a value is
            not numeric.
          StatisticsMissingError: no statistics were collected or loaded.
        """
        present = [key for key in NORMALIZED_KEYS if key in outputs]
        if not present:
            raise ValueError(errors.NO_VALUES_MESSAGE)
        self._check_stats(present)
        out = dict(outputs)
        for key in present:
            # Thresholds were checked when set and statistics just above, so this per-batch
            # path skips normalize's scalar checks, and its scalars stay on the device.
            params = self._device_params(NORMALIZED_KEYS[key])
            if key == "box_scores":
                boxes = ragged.check_boxes(key, outputs[key])
                padded, lengths = ragged.concat_padded(boxes)
                normalized = _normalize_packed(padded, params)
                out[key] = (
                    ragged.split_host(normalized, lengths)
                    if boxes_on_host
                    else ragged.split(normalized, lengths, boxes)
                )
            else:
                out[key] = _normalize_packed(validation.as_array(key, outputs[key]), params)
        return out

    def _check_stats(self, keys) -> None:
        stats = self.host_stats()
        for which in dict.fromkeys(NORMALIZED_KEYS[k] for k in keys):
            lo, hi = stats[which]
            if lo > hi:
                label = "" if self.stats_mode == "shared" else f"{which} "
                source = "'pred_scores'" if which == IMAGE else "'anomaly_maps' or 'box_scores'"
                seen = (
                    " (validation outputs had no " + source + ")"
                    if self.stats_mode == "separate"
                    else ""
                )
                raise errors.StatisticsMissingError(
                    f"no {label}normalization statistics{seen}: run validation "
                    "(on_validation_batch_end) or load statistics (load_state_dict, "
                    "load_json, set_stats) before test or predict; normalizing now would "
                    "turn every score into 0.5."
                )

    # -- saving and loading ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The hook's state as a pytree of arrays (``flax.serialization``/orbax friendly)."""
        return {
            "stats": self._stats,
            "image_threshold": np.float32(self.image_threshold),
            "pixel_threshold": np.float32(self.pixel_threshold),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()`` output, also as the plain dicts that msgpack returns."""
        try:
            stats = state["stats"]
            if not isinstance(stats, NormalizationStats):
                stats = NormalizationStats(
                    image=MinMax(**_f32(stats["image"])), pixel=MinMax(**_f32(stats["pixel"]))
                )
            image_threshold = state["image_threshold"]
            pixel_threshold = state["pixel_threshold"]
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"state: expected the layout of MinMaxNormalizationHook.state_dict(), missing {e}."
            ) from None
        self.image_threshold = float(np.asarray(image_threshold))
        self.pixel_threshold = float(np.asarray(pixel_threshold))
        self.set_stats(stats)

    def metadata(self) -> dict[str, float | None]:
        """anomalib's deployment metadata: thresholds and statistics in raw-score units.

        Shared statistics use anomalib 0.x's keys (``image_threshold``, ``pixel_threshold``,
        ``min``, ``max``), which its inferencers read. Separate statistics use
        ``pred_scores.min``/``.max`` and ``anomaly_maps.min``/``.max``. Empty statistics are
        ``None`` (JSON ``null``).
        """
        stats = self.host_stats()
        meta: dict[str, float | None] = {
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
        }
        if self.stats_mode == "shared":
            meta["min"], meta["max"] = (_finite(v) for v in stats[IMAGE])
        else:
            meta["pred_scores.min"], meta["pred_scores.max"] = (_finite(v) for v in stats[IMAGE])
            meta["anomaly_maps.min"], meta["anomaly_maps.max"] = (_finite(v) for v in stats[PIXEL])
        return meta

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """``metadata()`` as JSON; written to ``path`` when given."""
        text = json.dumps(self.metadata(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def load_json(self, source: str | os.PathLike | Mapping) -> None:
        """Loads thresholds and statistics from ``to_json`` output or anomalib metadata.

        Args:
          source: a path to a JSON file, a JSON string, or an already parsed dict.
        """
        if isinstance(source, Mapping):
            meta = dict(source)
        elif isinstance(source, str) and source.lstrip().startswith("{"):
            meta = json.loads(source)
        else:
            with open(source) as f:
                meta = json.load(f)
        if "min" in meta and "max" in meta:
            image = pixel = _minmax_from(meta, "min", "max")
            mode: StatsMode = "shared"
        elif "pred_scores.min" in meta or "anomaly_maps.min" in meta:
            image = _minmax_from(meta, "pred_scores.min", "pred_scores.max")
            pixel = _minmax_from(meta, "anomaly_maps.min", "anomaly_maps.max")
            mode = "separate"
        else:
            raise ValueError(
                f"metadata: no 'min'/'max' (or 'pred_scores.min', 'anomaly_maps.min') keys "
                f"among {sorted(meta)}; export it with MinMaxNormalizationHook.to_json()."
            )
        if "image_threshold" in meta:
            self.image_threshold = meta["image_threshold"]
        if "pixel_threshold" in meta:
            self.pixel_threshold = meta["pixel_threshold"]
        self.stats_mode = mode
        self.set_stats(NormalizationStats(image=image, pixel=pixel))

    @classmethod
    def from_json(cls, source: str | os.PathLike | Mapping, **kwargs) -> MinMaxNormalizationHook:
        """A hook with thresholds and statistics from ``to_json`` output or anomalib metadata."""
        hook = cls(**kwargs)
        hook.load_json(source)
        return hook

    def __repr__(self) -> str:
        (ilo, ihi), (plo, phi) = self.host_stats()[IMAGE], self.host_stats()[PIXEL]
        return (
            f"MinMaxNormalizationHook(image_threshold={self.image_threshold:g}, "
            f"pixel_threshold={self.pixel_threshold:g}, stats={self.stats_mode!r}, "
            f"image=[{ilo:g}, {ihi:g}], pixel=[{plo:g}, {phi:g}])"
        )


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _f32(d: Mapping) -> dict[str, jax.Array]:
    return {k: jnp.asarray(d[k], jnp.float32) for k in ("min", "max")}


def _minmax_from(meta: Mapping, lo_key: str, hi_key: str) -> MinMax:
    lo, hi = meta.get(lo_key), meta.get(hi_key)
    if lo is None or hi is None:
        return MinMax.empty()
    lo = validation.host_scalar(lo_key, lo)
    hi = validation.host_scalar(hi_key, hi)
    if hi < lo:
        raise ValueError(f"metadata: {hi_key} ({hi}) is smaller than {lo_key} ({lo}).")
    return MinMax(min=jnp.float32(lo), max=jnp.float32(hi))
