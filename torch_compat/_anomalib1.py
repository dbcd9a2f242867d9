"""anomalib 1.x's normalization callback: a thin adapter on torch_compat's layers 1 to 4.

Its own: the design of the installed release (``_anomalib1_design``: one shared ``MinMax``
never reset, a hook with ``stats="shared", accumulate=True``; or one ``MinMax`` per output
reset each validation epoch, a hook with ``stats="separate"`` whose image statistics live in
the ``pred_scores`` entry and pixel ones in the ``anomaly_maps`` entry), where each statistic
lives (anomalib's own ``MinMax`` instances, which its ``setup`` creates, so checkpoints,
their ``*_normalization_class`` keys and export metadata are anomalib's) and how anomalib's
updates leave them (``_anomalib1_store``), the ``box_scores`` entry that no hook statistic
stands for (``_anomalib1_boxes``), and anomalib's hook order.

The rest is the layers': the steady and full paths (``_steady``), statistics and thresholds
held outside the hook (``_lifecycle.StatsLink``, ``ThresholdLink``), the epoch end that
stores before it raises (``validation_epoch_end``), rank 0's values after a DDP restore
(``share_rank0``), the reducer (``_allreduce.epoch_reducer``), change detection
(``_change``) and the exchange (``_exchange``, ``_dlpack``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
from anomalib.callbacks.normalization.base import NormalizationCallback

from jaxnorm import MinMaxNormalizationHook, NonFiniteScoresError
from jaxnorm._src.hook import NonFinitePolicy
from jaxnorm._src.stats import IMAGE, PIXEL
from torch_compat import _change
from torch_compat._allreduce import epoch_reducer
from torch_compat._anomalib1_boxes import SOURCE as _SOURCE
from torch_compat._anomalib1_boxes import Boxes
from torch_compat._anomalib1_design import PER_OUTPUT, check_collection, detect_design, entry_pair
from torch_compat._anomalib1_store import SHARED_METRIC, note_fed, store
from torch_compat._lifecycle import (
    AdapterCaches,
    ThresholdLink,
    share_rank0,
    validation_epoch_end,
)
from torch_compat._minmax import ATTRIBUTE, stat_tensors

# Where the hook's statistics live in the per-output collection.
_ENTRIES = {IMAGE: "pred_scores", PIXEL: "anomaly_maps"}


class MinMaxNormalizationCallback(AdapterCaches, NormalizationCallback):
    """anomalib 1.x's min-max normalization, computed by jaxnorm: ``Engine(normalization=...)``.

    Does what the installed anomalib's ``_MinMaxNormalizationCallback`` does (its design,
    ``self.design``, is detected from it): the statistics live in anomalib's own ``MinMax``
    instances in ``pl_module.normalization_metrics`` (attached by anomalib's ``setup``,
    replaced by anomalib when a state dict is loaded, so looked up at each use), so
    checkpoints, their keys and export metadata are anomalib's, and load both ways.
    Validation outputs feed them through jaxnorm (one dispatch per batch, no host read per
    batch); test and predict outputs are normalized in place (one import, one dispatch, one
    export per steady batch) after anomalib's post-processor has computed ``pred_labels`` and
    ``pred_masks`` from the raw scores; ``on_test_start`` sets the metrics' thresholds to 0.5.

    What differs from anomalib's: under DDP the statistics are all-reduced across ranks;
    NaN/inf validation scores raise ``jaxnorm.NonFiniteScoresError`` (``nonfinite="omit"``
    skips them); testing without statistics raises instead of giving 0.5 everywhere; a
    ``BoxScoresWarning`` says when box scores become 0.5 (anomalib's outputs, see
    docs/anomalib1.md).

    Args:
      nonfinite: ``"raise"`` (default) or ``"omit"``, as in
        ``torch_compat.MinMaxNormalizationCallback``.
    """

    def __init__(self, *, nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__()
        self.design = detect_design()
        per_output = self.design == PER_OUTPUT
        self.hook = MinMaxNormalizationHook(
            stats="separate" if per_output else "shared",
            accumulate=not per_output,  # the shared MinMax is never reset
            nonfinite=nonfinite,
            reducer=None,  # chosen at each validation epoch start
        )
        self._boxes = Boxes(nonfinite) if per_output else None
        self._fed: dict[str, torch.dtype] = {}  # what this epoch fed (_anomalib1_store)
        self._init_caches()

    # -- where the statistics live: anomalib's own MinMax instances ------------------------

    def _metrics(self, pl_module: Any) -> Any:
        """``pl_module.normalization_metrics``, attached by anomalib's own ``setup`` when
        missing (anomalib's classes, as its checkpoints name them), checked otherwise."""
        if getattr(pl_module, ATTRIBUTE, None) is None:
            _MinMaxNormalizationCallback().setup(None, pl_module, None)
        metrics = getattr(pl_module, ATTRIBUTE)
        if self._boxes is not None:
            check_collection(metrics)
        return metrics

    def _pairs(self, pl_module: Any) -> dict:
        """The hook's statistics as anomalib holds them: ``{"image": ((min_key, min),
        (max_key, max)), "pixel": ...}`` (``_lifecycle``'s form), read at each call."""
        metrics = self._metrics(pl_module)
        if self._boxes is None:
            return stat_tensors(metrics, "shared")  # one pair, twice
        return {which: entry_pair(metrics[key], key) for which, key in _ENTRIES.items()}

    def _sources(self, pl_module: Any) -> tuple | None:
        """The statistics' and thresholds' objects and keys (``_change.key``: values on the
        host, checks on an accelerator) for a test plan to compare; ``None`` when one is
        unknown (read at every batch)."""
        metrics = getattr(pl_module, ATTRIBUTE, None)
        tensors = (
            ()
            if metrics is None
            else tuple(t for p in self._pairs(pl_module).values() for _, t in p)
        )
        objects = (metrics, *tensors, *ThresholdLink.values(pl_module))
        keys = tuple(None if v is None else _change.key(v) for v in objects[1:])
        if any(k is None and v is not None for k, v in zip(keys, objects[1:], strict=True)):
            return None
        return objects, keys

    def _values(self, pl_module: Any) -> tuple:
        """The thresholds' and statistics' values as anomalib holds them, image ``t, min,
        max`` then pixel (``_steady.route_values``'s order)."""
        pairs = self._pairs(pl_module)
        image_t, pixel_t = ThresholdLink.values(pl_module)
        return (image_t, *(t for _, t in pairs[IMAGE]), pixel_t, *(t for _, t in pairs[PIXEL]))

    def _load(self, pl_module: Any) -> None:
        """Rank 0's statistics on every rank (after a DDP restore), read into the hook where
        they changed."""
        pairs = self._pairs(pl_module)
        share_rank0(pairs)
        self._stats.load(self.hook, pairs, _SOURCE)

    # -- Lightning hooks, in anomalib's order ----------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """anomalib's ``setup`` (attaches its metrics when missing, checks their classes)."""
        _MinMaxNormalizationCallback().setup(trainer, pl_module, stage)
        self._metrics(pl_module)
        self._stats.forget()
        self._plan = self._validation_plan = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Resets every statistic (per-output, as anomalib) or goes on from the stored ones
        (shared: anomalib never resets them)."""
        del trainer
        self.hook.reducer = epoch_reducer()
        self._fed = {}
        if self._boxes is not None:
            self._metrics(pl_module).reset()  # as anomalib, every entry
            self._boxes.start_epoch()
        else:
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
        """Folds the batch into the statistics (maps, else boxes, else scores, shared; each
        output into its own, per output)."""
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        note_fed(self._fed, outputs, self._boxes is not None)
        if self._boxes is not None and isinstance(outputs, Mapping) and "box_scores" in outputs:
            self._boxes.fold(outputs["box_scores"])
            outputs = {k: v for k, v in outputs.items() if k != "box_scores"}
            if not any(key in outputs for key in _ENTRIES.values()):
                return  # anomalib >= 1.1.1 folds each output present: boxes alone here
        self._fold_validation(outputs)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """All-reduces the statistics under DDP and stores them in anomalib's metrics.

        Raises:
          NonFiniteScoresError: a batch of this epoch held NaN/inf under
            ``nonfinite="raise"``; the statistics of the clean batches are stored first.
        """
        del trainer
        error = None
        if self._boxes is not None:
            try:
                metric = self._metrics(pl_module)["box_scores"]
                self._boxes.end_epoch(metric, self._fed.get("box_scores"))
            except NonFiniteScoresError as e:
                error = e  # the other statistics are reduced and stored all the same
        with validation_epoch_end(self.hook) as stats:
            metrics = self._metrics(pl_module)
            if self._boxes is None:
                store(metrics, stats[IMAGE], self._fed.get(SHARED_METRIC))
            else:
                for which, key in _ENTRIES.items():
                    store(metrics[key], stats[which], self._fed.get(key))
            self._stats.stored(self._pairs(pl_module), self.hook)
        if error is not None:
            raise error

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Sets the metrics' thresholds to 0.5 and loads the statistics (e.g. restored)."""
        del trainer
        for metrics in (pl_module.image_metrics, pl_module.pixel_metrics):
            if metrics is not None:
                metrics.set_threshold(0.5)
        self._stats.forget()  # read once per run, wherever they are
        self._load(pl_module)
        self.hook.on_test_start()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Loads the statistics (e.g. restored from a checkpoint)."""
        del trainer
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
        """Normalizes the outputs dict in place (test and predict: ``engine.predict``
        returns it normalized)."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_batch(outputs, pl_module)

    on_predict_batch_end = on_test_batch_end

    def _normalize_batch(self, outputs: Any, pl_module: Any) -> None:
        """Scores with the image threshold, maps (and box scores) with the pixel one."""
        boxes = None
        if self._boxes is not None and type(outputs) is dict and "box_scores" in outputs:
            boxes, whole = outputs["box_scores"], outputs
            outputs = {k: v for k, v in whole.items() if k != "box_scores"}
        if boxes is None or any(key in outputs for key in _ENTRIES.values()):
            self._normalize_test(outputs, pl_module)  # by the cache rule of _change
        if boxes is not None:
            for key in _ENTRIES.values():
                if key in outputs:
                    whole[key] = outputs[key]
            metric = self._metrics(pl_module)["box_scores"]
            threshold = pl_module.pixel_threshold.value
            whole["box_scores"] = self._boxes.normalize(boxes, metric, threshold)

    def _load_values(self, pl_module: Any) -> None:
        self._stats.load(self.hook, self._pairs(pl_module), _SOURCE)
        self._thresholds.load(self.hook, pl_module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(design={self.design!r}, nonfinite={self.hook.nonfinite!r})"
