"""anomalib 1.x's normalization callback on torch_compat's Lightning hooks.

anomalib 1.x shipped two designs of ``_MinMaxNormalizationCallback`` (SPEC §9):

- ``SHARED`` (1.0.x, 1.1.0, 1.1.3): ``pl_module.normalization_metrics`` is one ``MinMax``, fed
  by the first of ``anomaly_maps``, ``box_scores``, ``pred_scores``, never reset: anomalib
  0.x's callback, which ``MinMaxNormalizationHooks(stats="shared", accumulate=True)`` is.
- ``PER_OUTPUT`` (1.1.1, 1.1.2, 1.2.0, anomalib #2130): a ``MetricCollection`` of one
  ``MinMax`` per output (``anomaly_maps``, ``box_scores``, ``pred_scores``), reset at each
  validation epoch start: ``stats="separate"``, the image statistics being the
  ``pred_scores`` entry and the pixel ones the ``anomaly_maps`` entry, seen through
  ``_PerOutputView``. The ``box_scores`` entry is handled here (``_Boxes``).

The design is asked of anomalib's own callback (``detect_design``), not read from a version
table: what its ``setup`` attaches and whether its validation epoch start resets it. The
statistics stay in anomalib's own ``MinMax`` instances, which its ``setup`` creates, so
checkpoints, their ``*_normalization_class`` keys and export metadata are anomalib's.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
from anomalib.callbacks.normalization.base import NormalizationCallback
from anomalib.metrics import MinMax
from torchmetrics import MetricCollection

from jaxnorm import MinMax as JaxMinMax
from jaxnorm import MinMaxNormalizationHook, NonFiniteScoresError
from jaxnorm._src.hook import NonFinitePolicy
from jaxnorm._src.validation import loaded_stats
from torch_compat._allreduce import allreduce_stats, ddp_active
from torch_compat._callback import MinMaxNormalizationHooks, _JaxView, fold_validation_batch
from torch_compat._dlpack import host_to_torch
from torch_compat._minmax import ATTRIBUTE, stat_tensors, write_in_place

SHARED = "shared"
PER_OUTPUT = "per-output"
_KEYS = ("anomaly_maps", "box_scores", "pred_scores")  # the per-output collection's
_BOX_MIN, _BOX_MAX = f"{ATTRIBUTE}.box_scores.min", f"{ATTRIBUTE}.box_scores.max"


class BoxScoresWarning(UserWarning):
    """anomalib >= 1.1.1 normalizes ``box_scores`` with statistics that validation never fills:
    every box score becomes 0.5. This callback gives the same outputs, and says so once."""


@functools.cache
def detect_design() -> str:
    """``SHARED`` or ``PER_OUTPUT``: the design of the installed anomalib's own callback.

    Its ``setup`` is run on a bare namespace (what does it attach?), one value is folded in,
    and its ``on_validation_epoch_start`` is called (is it reset?). This follows the code
    that is installed, hotfix releases and patched copies included, where a version table
    would have to know them all.

    Raises:
      ImportError: the callback behaves as neither design.
    """
    callback, probe = _MinMaxNormalizationCallback(), types.SimpleNamespace()
    callback.setup(None, probe, "validate")
    metrics = getattr(probe, ATTRIBUTE, None)
    if isinstance(metrics, MetricCollection) and sorted(metrics.keys()) == sorted(_KEYS):
        design, watched = PER_OUTPUT, metrics["pred_scores"]
    elif isinstance(metrics, MinMax):
        design, watched = SHARED, metrics
    else:
        raise ImportError(
            f"anomalib's _MinMaxNormalizationCallback.setup attached {type(metrics).__name__} "
            f"({metrics!r}), neither one MinMax nor a MetricCollection of {_KEYS}; "
            "torch_compat.anomalib1 knows anomalib 1.0.0 to 1.2.0."
        )
    watched.update(torch.tensor([1.0]))
    callback.on_validation_epoch_start(None, probe)
    reset = math.isinf(float(watched.min))  # reset() replaces the states of the same metric
    if reset != (design == PER_OUTPUT):
        raise ImportError(
            f"anomalib's _MinMaxNormalizationCallback keeps a {design} design but "
            f"{'resets' if reset else 'does not reset'} it at each validation epoch start; "
            "torch_compat.anomalib1 knows anomalib 1.0.0 to 1.2.0."
        )
    return design


class _PerOutputView:
    """The image (``pred_scores``) and pixel (``anomaly_maps``) statistics of anomalib's
    per-output ``MetricCollection``, as the shared hooks read them (``min``, ``max``,
    ``pixel_min``, ``pixel_max``) and named by their state-dict keys.

    Cache rule: the view holds no statistic and no strong reference to the collection; each
    attribute reads the collection's current state tensors, so in-place writes, replaced
    states (``reset()``, ``load_state_dict``) and replaced entries are seen by the hooks'
    own change detection. A view stands for one collection object: anomalib replaces the
    collection when it loads a state dict, and ``MinMaxNormalizationCallback._home`` then
    makes a new view (a collection never outlives its view's use: the weak reference).
    """

    state_keys = {
        "min": f"{ATTRIBUTE}.pred_scores.min",
        "max": f"{ATTRIBUTE}.pred_scores.max",
        "pixel_min": f"{ATTRIBUTE}.anomaly_maps.min",
        "pixel_max": f"{ATTRIBUTE}.anomaly_maps.max",
    }

    def __init__(self, collection: MetricCollection) -> None:
        self.collection = weakref.ref(collection)

    def _state(self, key: str, state: str) -> torch.Tensor:
        return getattr(self.collection()[key], state)

    min = property(lambda self: self._state("pred_scores", "min"))
    max = property(lambda self: self._state("pred_scores", "max"))
    pixel_min = property(lambda self: self._state("anomaly_maps", "min"))
    pixel_max = property(lambda self: self._state("anomaly_maps", "max"))


class _Boxes:
    """The ``box_scores`` entry of the per-output design, which the shared hooks (image and
    pixel statistics) do not hold: its own jaxnorm hook folds the box scores of validation
    outputs (none in anomalib's models but a detector's), and normalizes test box scores
    with them and the pixel threshold. Empty statistics give anomalib's 0.5."""

    def __init__(self, nonfinite: NonFinitePolicy) -> None:
        self.hook = MinMaxNormalizationHook(stats="shared", nonfinite=nonfinite, reducer=None)
        self.warned = False
        self.loaded: tuple[float, float, float] | None = None  # what self.hook normalizes with

    def start_epoch(self) -> None:
        self.hook.reducer = allreduce_stats if ddp_active() else None
        self.hook.on_validation_epoch_start()
        self.loaded = None  # the fold replaces the hook's statistics

    def fold(self, boxes: Any) -> None:
        fold_validation_batch(self.hook, {"box_scores": boxes}, None)

    def end_epoch(self, metric: MinMax) -> None:
        """Stores the epoch's box statistics in anomalib's ``box_scores`` metric (all-reduced
        under DDP: every rank calls this, boxes or not)."""
        try:
            self.hook.on_validation_epoch_end()
        finally:
            lo, hi = self.hook.host_stats()["image"]
            write_in_place(metric.min, lo)
            write_in_place(metric.max, hi)

    def normalize(self, boxes: Any, metric: MinMax, threshold: Any) -> list:
        """``boxes`` normalized with ``metric``'s statistics and the pixel threshold.

        The statistics and the threshold are read on the host at each batch: box scores are
        split there anyway (anomalib's post-processor made them on the host too). The hook
        is given them only when they changed (a hit is keyed by the values just read, so no
        write, load or replacement of the metric can go unseen).

        Raises:
          ValueError: statistics that are NaN, infinite (but the empty pair) or ``max <
            min``, naming the key.
        """
        lo, hi = loaded_stats("pl_module", _BOX_MIN, metric.min, _BOX_MAX, metric.max)
        if lo > hi:  # the empty pair: validation saw no box scores
            if not self.warned:
                self.warned = True
                warnings.warn(
                    "box_scores normalized to 0.5: anomalib >= 1.1.1 normalizes them with "
                    "statistics of their own, which only validation outputs holding "
                    "box_scores fill, and its models' validation outputs hold none; this "
                    "callback gives the same outputs as anomalib's (said once per callback).",
                    BoxScoresWarning,
                    stacklevel=1,
                )
            # anomalib's (x - t) / (-inf - inf) + 0.5: 0.5 for every finite score, NaN else
            return [
                torch.where(b.isfinite(), 0.5, math.nan).to(torch.result_type(b, 0.5))
                for b in boxes
            ]
        loaded = (lo, hi, float(threshold))
        if loaded != self.loaded:
            self.hook.set_stats(JaxMinMax(min=lo, max=hi))
            self.hook.pixel_threshold = loaded[2]
            self.loaded = loaded
        view = _JaxView({"box_scores": boxes})
        normalized = self.hook.normalize_batch(view, boxes_on_host=True)["box_scores"]
        return [
            host_to_torch(n, b).reshape(b.shape) for n, b in zip(normalized, boxes, strict=True)
        ]


class MinMaxNormalizationCallback(MinMaxNormalizationHooks, NormalizationCallback):
    """anomalib 1.x's min-max normalization, computed by jaxnorm: ``Engine(normalization=...)``.

    Does what the installed anomalib's ``_MinMaxNormalizationCallback`` does (its design,
    ``self.design``, is detected from it): the statistics live in anomalib's own ``MinMax``
    instances in ``pl_module.normalization_metrics`` (attached by anomalib's ``setup``,
    replaced by anomalib when a state dict is loaded), so checkpoints, their keys and export
    metadata are anomalib's, and load both ways. Validation outputs feed them, through
    jaxnorm (one dispatch per batch, no host read per batch); test and predict outputs are
    normalized in place after anomalib's post-processor has computed ``pred_labels`` and
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
        self.design = detect_design()
        per_output = self.design == PER_OUTPUT
        super().__init__(
            stats="separate" if per_output else "shared",
            accumulate=not per_output,  # the shared MinMax is never reset
            nonfinite=nonfinite,
        )
        self._boxes = _Boxes(nonfinite) if per_output else None
        self._view: _PerOutputView | None = None

    # -- where the statistics live: anomalib's own MinMax instances ------------------------

    def _metrics(self, pl_module: Any) -> Any:
        """The statistics' home (see ``_home``), attached by anomalib's own ``setup`` when
        missing: anomalib's classes, as its checkpoints name them."""
        if getattr(pl_module, ATTRIBUTE, None) is None:
            _MinMaxNormalizationCallback().setup(None, pl_module, None)
        home = self._home(pl_module)
        stat_tensors(home, self.hook.stats_mode)  # raises, naming what is there
        return home

    def _home(self, pl_module: Any) -> Any:
        metrics = getattr(pl_module, ATTRIBUTE, None)
        if self._boxes is None or metrics is None:
            return metrics
        view = self._view
        if view is None or view.collection() is not metrics:
            _check_collection(metrics)
            view = self._view = _PerOutputView(metrics)
        return view

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """anomalib's ``setup`` (attaches its metrics when missing, checks their classes)."""
        _MinMaxNormalizationCallback().setup(trainer, pl_module, stage)
        super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._boxes is not None:
            getattr(pl_module, ATTRIBUTE).reset()  # as anomalib, every entry
            self._boxes.start_epoch()
        super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._boxes is not None and isinstance(outputs, Mapping) and "box_scores" in outputs:
            self._boxes.fold(outputs["box_scores"])
            outputs = {k: v for k, v in outputs.items() if k != "box_scores"}
            if not any(key in outputs for key in ("pred_scores", "anomaly_maps")):
                return  # anomalib >= 1.1.1 folds each output present: boxes alone here
        super().on_validation_batch_end(
            trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
        )

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        error = None
        if self._boxes is not None:
            try:
                self._boxes.end_epoch(getattr(pl_module, ATTRIBUTE)["box_scores"])
            except NonFiniteScoresError as e:
                error = e
        try:
            super().on_validation_epoch_end(trainer, pl_module)
        finally:
            if self._boxes is not None:
                # written outside update(): compute() must not return a stale cache
                for metric in getattr(pl_module, ATTRIBUTE).values():
                    metric._computed = None
                    metric._update_count = max(metric._update_count, 1)
        if error is not None:
            raise error

    def _normalize_batch(self, outputs: Any, pl_module: Any) -> None:
        if self._boxes is None or type(outputs) is not dict or "box_scores" not in outputs:
            super()._normalize_batch(outputs, pl_module)
            return
        rest = {k: v for k, v in outputs.items() if k != "box_scores"}
        if any(k in rest for k in ("pred_scores", "anomaly_maps")):
            super()._normalize_batch(rest, pl_module)
        for key in ("pred_scores", "anomaly_maps"):
            if key in rest:
                outputs[key] = rest[key]
        metric = getattr(pl_module, ATTRIBUTE)["box_scores"]
        threshold = pl_module.pixel_threshold.value
        outputs["box_scores"] = self._boxes.normalize(outputs["box_scores"], metric, threshold)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_view"] = None  # a weak reference; rebuilt at first use
        return state


def _check_collection(metrics: Any) -> None:
    """anomalib's per-output collection, with a ``MinMax`` for each output (anomalib's
    ``setup`` checks the same; this names what a hand-made attribute lacks)."""
    if not isinstance(metrics, MetricCollection) or any(k not in metrics for k in _KEYS):
        raise TypeError(
            f"pl_module.{ATTRIBUTE} is a {type(metrics).__qualname__}"
            + (f" with keys {sorted(metrics.keys())}" if isinstance(metrics, Mapping) else "")
            + f"; anomalib {_version()} keeps a MetricCollection of anomalib.metrics.MinMax "
            f"keyed {list(_KEYS)} there. Delete the attribute (the callback then attaches "
            "anomalib's), or load a checkpoint saved with this anomalib."
        )


def _version() -> str:
    import anomalib

    return anomalib.__version__
