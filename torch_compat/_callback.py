"""The Lightning hooks of anomalib 0.x's callback, wired to one ``jaxnorm.MinMaxNormalizationHook``.

This module holds the lifecycle and the ``pl_module`` rules of anomalib 0.x (its attributes,
``normalization_metrics``); the exchange, the steady paths and the lifecycle helpers are
shared with the other adapters (``_exchange``, ``_steady``, ``_lifecycle``). It imports no
Lightning namespace: ``torch_compat.pytorch_lightning`` and ``torch_compat.lightning`` mix
``MinMaxNormalizationHooks`` into each namespace's ``Callback``.
"""

from __future__ import annotations

from typing import Any

from jaxnorm import MinMaxNormalizationHook
from jaxnorm._src.validation import NonFinitePolicy, StatsMode
from torch_compat import _allreduce, _change
from torch_compat._lifecycle import (
    AdapterCaches,
    ThresholdLink,
    share_rank0,
    validation_epoch_end,
)
from torch_compat._minmax import ATTRIBUTE, MinMax, check_holds_separate, stat_tensors, write_stats


class MinMaxNormalizationHooks(AdapterCaches):
    """Min-max normalization of anomaly scores: anomalib's callback, computed by jaxnorm.

    A drop-in for ``anomalib.utils.callbacks.MinMaxNormalizationCallback`` (anomalib 0.3.6 to
    0.7): the same hooks and signatures, the same ``pl_module`` attributes
    (``image_threshold.value``, ``pixel_threshold.value``, ``image_metrics``,
    ``pixel_metrics``, ``normalization_metrics``) and the same output keys
    (``anomaly_maps``, ``box_scores``, ``pred_scores``). Validation outputs feed the
    statistics; test and predict outputs are normalized in place, so ``trainer.predict``
    returns scores in [0, 1] with each threshold at 0.5.

    Tensors go to jax through DLPack (zero-copy on CPU, and on CUDA when jax has a GPU) and
    all the work is done by one ``jaxnorm.MinMaxNormalizationHook``, ``self.hook``; results
    come back as tensors with the input's dtype, shape and device.

    The statistics live in ``pl_module.normalization_metrics`` (a ``torch_compat.MinMax``,
    attached when missing; any object whose ``min`` and ``max`` are tensors is kept, such as
    the ``anomalib.utils.metrics.MinMax`` that anomalib's ``load_state_dict`` puts there):
    written in place at each validation epoch end and read back before test and predict, so
    they travel in checkpoints under anomalib's keys and ``trainer.test(model, ckpt_path=...)``
    normalizes with them. Statistics read back are checked first (finite or empty, one
    number each, ``max >= min``); unchanged tensors are not read again. Under DDP (any
    torch.distributed process group) every rank ends each validation epoch with the global
    statistics.

    The hooks use nothing of ``trainer``: they can be driven by hand with ``trainer=None``.
    This class holds the hooks; ``torch_compat.MinMaxNormalizationCallback`` and
    ``torch_compat.lightning.MinMaxNormalizationCallback`` mix it into each Lightning
    namespace's ``Callback``.

    Args:
      stats: ``"shared"`` (default, anomalib 0.x: one min/max from maps, else boxes, else
        scores) or ``"separate"`` (image statistics from ``pred_scores``, pixel statistics
        from maps or boxes, as anomalib >= 1.1.1).
      accumulate: keep the statistics across validation epochs, sanity check included, as
        anomalib 0.x did. The default resets them at each validation epoch start.
      nonfinite: ``"raise"`` (default): NaN or inf in validation outputs raise
        ``jaxnorm.NonFiniteScoresError`` naming the key and count (under DDP, at epoch end
        on every rank). ``"omit"``: they are skipped.
    """

    def __init__(
        self,
        *,
        stats: StatsMode = "shared",
        accumulate: bool = False,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__()
        # The thresholds are read from pl_module before each batch; the reducer is chosen at
        # each validation epoch start (torch.distributed, not JAX processes).
        self.hook = MinMaxNormalizationHook(
            stats=stats, accumulate=accumulate, nonfinite=nonfinite, reducer=None
        )
        self._init_caches()

    # -- the statistics' home: pl_module.normalization_metrics -----------------------------

    def _metrics(self, pl_module: Any) -> Any:
        """``pl_module.normalization_metrics``: attached if missing, checked otherwise.

        Any object whose ``min`` and ``max`` are one-element tensors will do: ours, or the
        ``anomalib.utils.metrics.MinMax`` that anomalib's ``load_state_dict`` puts there.
        """
        metrics = getattr(pl_module, ATTRIBUTE, None)
        if metrics is None:
            metrics = MinMax(self.hook.stats_mode)
            setattr(pl_module, ATTRIBUTE, metrics)
        stat_tensors(metrics, self.hook.stats_mode)  # raises, naming what is there
        return metrics

    def _pairs(self, pl_module: Any) -> dict:
        return stat_tensors(self._metrics(pl_module), self.hook.stats_mode)

    def _sources(self, pl_module: Any) -> tuple | None:
        """The thresholds' and statistics' objects and their keys (``_change.key``), for a
        plan to compare (objects by identity, keys by equality); ``None`` when a key is
        unknown (e.g. a tensor that is not one number): such sources are read at every
        batch."""
        metrics = getattr(pl_module, ATTRIBUTE, None)
        objects = [metrics, getattr(metrics, "min", None), getattr(metrics, "max", None)]
        if self.hook.stats_mode == "separate":
            objects += [getattr(metrics, "pixel_min", None), getattr(metrics, "pixel_max", None)]
        objects += ThresholdLink.values(pl_module)
        keys = []
        for value in objects[1:]:
            key = None if value is None else _change.key(value)
            if key is None and value is not None:
                return None
            keys.append(key)
        return tuple(objects), tuple(keys)

    def _values(self, pl_module: Any) -> tuple:
        """The thresholds' and statistics' values, image ``t, min, max`` then pixel (called
        with them loaded, so checked)."""
        pairs = stat_tensors(getattr(pl_module, ATTRIBUTE), self.hook.stats_mode)
        image_t, pixel_t = ThresholdLink.values(pl_module)
        values = (image_t, *(t for _, t in pairs["image"]), pixel_t)
        return values + tuple(t for _, t in pairs["pixel"])

    def _load(self, pl_module: Any, *, thresholds: bool = False) -> None:
        """Reads the statistics (and the thresholds) into the hook where they changed.

        Raises:
          ValueError: naming the source, key and value, for statistics that are not finite
            (other than the empty pair), not one number each, or with ``max < min``.
        """
        metrics = self._metrics(pl_module)
        source = "checkpoint" if getattr(metrics, "loaded_from_checkpoint", False) else ATTRIBUTE
        self._stats.load(self.hook, stat_tensors(metrics, self.hook.stats_mode), source)
        if thresholds:
            self._thresholds.load(self.hook, pl_module)

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Attaches ``normalization_metrics`` (keeping a compatible one, e.g. restored)."""
        del trainer, stage
        metrics = self._metrics(pl_module)
        if isinstance(metrics, MinMax):
            metrics.configure(self.hook.stats_mode)
        self._stats.forget()
        self._plan = self._validation_plan = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Resets the statistics, unless ``accumulate=True``.

        Accumulation goes on from the statistics in ``normalization_metrics`` (e.g. restored
        when resuming from a checkpoint), as anomalib's metric state did.
        """
        del trainer
        self.hook.reducer = _allreduce.epoch_reducer()
        check_holds_separate(self._metrics(pl_module), self.hook.stats_mode)
        if self.hook.accumulate:
            share_rank0(self._pairs(pl_module))
            self._load(pl_module)
        self.hook.on_validation_epoch_start()

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Folds the batch's maps, else box scores, else image scores into the statistics."""
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        self._fold_validation(outputs)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """All-reduces the statistics under DDP and stores them in ``normalization_metrics``.

        Raises:
          NonFiniteScoresError: a batch of this epoch held NaN/inf under
            ``nonfinite="raise"`` (the hooks never read the device per batch, so this is where
            it surfaces). The statistics of the clean batches are stored first: nothing
            collected is lost.
        """
        del trainer
        with validation_epoch_end(self.hook) as stats:
            metrics = self._metrics(pl_module)
            write_stats(metrics, self.hook.stats_mode, stats)
            self._stats.stored(stat_tensors(metrics, self.hook.stats_mode), self.hook)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Sets the metrics' thresholds to 0.5 and loads the statistics (e.g. restored)."""
        del trainer
        for metrics in (
            getattr(pl_module, "image_metrics", None),
            getattr(pl_module, "pixel_metrics", None),
        ):
            if metrics is not None:
                metrics.set_threshold(0.5)
        share_rank0(self._pairs(pl_module))
        self._stats.forget()  # read once per run, wherever they are
        self._load(pl_module)
        self.hook.on_test_start()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Loads the statistics (e.g. restored from a checkpoint)."""
        del trainer
        share_rank0(self._pairs(pl_module))
        self._stats.forget()  # read once per run, wherever they are
        self._load(pl_module)

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Normalizes the outputs dict in place."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_test(outputs, pl_module)

    def on_predict_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Normalizes the outputs dict in place, so ``trainer.predict`` returns it normalized."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_test(outputs, pl_module)

    def _load_values(self, pl_module: Any) -> None:
        self._load(pl_module, thresholds=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(stats={self.hook.stats_mode!r}, "
            f"accumulate={self.hook.accumulate}, nonfinite={self.hook.nonfinite!r})"
        )
