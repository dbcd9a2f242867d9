"""anomalib 0.7.0's min-max normalization code, restated statement for statement.

The one restatement the project keeps: the benchmarks time it as the baseline jaxnorm
replaces, and the tests (``tests/torch_compat/test_anomalib07_checkpoints.py``) use it as anomalib's
callback. It is copied from anomalib v0.7.0's source, where each piece lives in:

- ``normalize``: ``src/anomalib/post_processing/normalization/min_max.py``;
- ``MinMax``: ``src/anomalib/utils/metrics/min_max.py``, a torchmetrics ``Metric`` with two
  persistent states;
- ``MinMaxNormalizationCallback``: ``src/anomalib/utils/callbacks/min_max_normalization.py``,
  without its Lightning base class (``Callback`` adds nothing to a batch's cost): mix one in,
  ``class C(MinMaxNormalizationCallback, pl.Callback)``, to hand it to a ``Trainer``.

One deviation: ``dataloader_idx`` defaults to 0, because Lightning 2 passes it only when
there are several loaders. anomalib's costs are kept on purpose: 0-d tensor operands,
``torch.tensor(1)`` and ``torch.tensor(0)`` built on every call, two reductions per update,
and the ``.cpu()`` calls on thresholds and statistics in ``_normalize_batch``. The real
package is compared with jaxnorm in ``tests_anomalib/`` (``make test-anomalib``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch


def normalize(targets: Any, threshold: Any, min_val: Any, max_val: Any) -> Any:
    """Apply min-max normalization and shift the values such that the threshold value is centered at 0.5."""  # noqa: E501 - anomalib's words
    normalized = ((targets - threshold) / (max_val - min_val)) + 0.5
    if isinstance(targets, (np.ndarray, np.float32, np.float64)):
        normalized = np.minimum(normalized, 1)
        normalized = np.maximum(normalized, 0)
    elif isinstance(targets, torch.Tensor):
        normalized = torch.minimum(normalized, torch.tensor(1))
        normalized = torch.maximum(normalized, torch.tensor(0))
    else:
        raise ValueError(f"Targets must be either Tensor or Numpy array. Received {type(targets)}")
    return normalized


@functools.cache
def _minmax_class() -> type:
    # torchmetrics takes seconds to import; the memory case's processes only need normalize.
    from torchmetrics import Metric

    class MinMax(Metric):
        """Track the min and max values of the observations in each batch."""

        full_state_update: bool = True

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.add_state("min", torch.tensor(float("inf")), persistent=True)
            self.add_state("max", torch.tensor(float("-inf")), persistent=True)

            self.min = torch.tensor(float("inf"))
            self.max = torch.tensor(float("-inf"))

        def update(self, predictions: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            """Update the min and max values."""
            del args, kwargs
            self.max = torch.max(self.max, torch.max(predictions))
            self.min = torch.min(self.min, torch.min(predictions))

        def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
            """Return min and max values."""
            return self.min, self.max

    return MinMax


def __getattr__(name: str) -> Any:
    # ``MinMax`` is built on first use, so that importing this module imports no torchmetrics.
    if name == "MinMax":
        return _minmax_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MinMaxNormalizationCallback:
    """Normalizes the image-level and pixel-level anomaly scores with min-max normalization."""

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Adds min_max metrics to normalization metrics."""
        del trainer, stage
        minmax = _minmax_class()
        if not hasattr(pl_module, "normalization_metrics"):
            pl_module.normalization_metrics = minmax().cpu()
        elif not isinstance(pl_module.normalization_metrics, minmax):
            raise AttributeError(
                "Expected normalization_metrics to be of type MinMax, got "
                f"{type(pl_module.normalization_metrics)}"
            )

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Called when the test begins."""
        del trainer
        for metric in (pl_module.image_metrics, pl_module.pixel_metrics):
            if metric is not None:
                metric.set_threshold(0.5)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Called when the validation batch ends, update the min and max observed values."""
        del trainer, batch, batch_idx, dataloader_idx
        if "anomaly_maps" in outputs:
            pl_module.normalization_metrics(outputs["anomaly_maps"])
        elif "box_scores" in outputs:
            pl_module.normalization_metrics(torch.cat(outputs["box_scores"]))
        elif "pred_scores" in outputs:
            pl_module.normalization_metrics(outputs["pred_scores"])
        else:
            raise ValueError(
                "No values found for normalization, provide anomaly maps, bbox scores, or "
                "image scores"
            )

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Called when the test batch ends, normalizes the predicted scores and anomaly maps."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_batch(outputs, pl_module)

    def on_predict_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Called when the predict batch ends, normalizes the predicted scores and anomaly maps."""
        del trainer, batch, batch_idx, dataloader_idx
        self._normalize_batch(outputs, pl_module)

    @staticmethod
    def _normalize_batch(outputs: Any, pl_module: Any) -> None:
        """Normalize a batch of predictions."""
        image_threshold = pl_module.image_threshold.value.cpu()
        pixel_threshold = pl_module.pixel_threshold.value.cpu()
        stats = pl_module.normalization_metrics.cpu()
        outputs["pred_scores"] = normalize(
            outputs["pred_scores"], image_threshold, stats.min, stats.max
        )
        if "anomaly_maps" in outputs:
            outputs["anomaly_maps"] = normalize(
                outputs["anomaly_maps"], pixel_threshold, stats.min, stats.max
            )
        if "box_scores" in outputs:
            outputs["box_scores"] = [
                normalize(scores, pixel_threshold, stats.min, stats.max)
                for scores in outputs["box_scores"]
            ]
