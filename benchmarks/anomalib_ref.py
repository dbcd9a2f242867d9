"""anomalib 0.7's eager torch code path, restated from SPEC §1: the baseline jaxnorm replaces.

Only what the benchmarks time is restated: ``normalize``, the ``MinMax`` metric and the
callback's per-batch work. The restatement keeps anomalib's costs on purpose: 0-d tensor
operands, ``torch.tensor(1)`` built on every call, two reductions per update, and the
``.cpu()`` calls on thresholds and statistics in ``_normalize_batch``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch


def normalize(targets: Any, threshold: Any, min_val: Any, max_val: Any) -> Any:
    """anomalib 0.7 ``anomalib.post_processing.normalization.min_max.normalize``."""
    normalized = ((targets - threshold) / (max_val - min_val)) + 0.5
    if isinstance(targets, (np.ndarray, np.generic)):
        normalized = np.minimum(normalized, 1)
        normalized = np.maximum(normalized, 0)
    elif isinstance(targets, torch.Tensor):
        normalized = torch.minimum(normalized, torch.tensor(1))
        normalized = torch.clamp(normalized, min=0)
    else:
        raise ValueError(f"Targets must be either Tensor or Numpy array. Received {type(targets)}")
    return normalized


@functools.cache
def _minmax_class() -> type:
    # torchmetrics takes seconds to import; the memory probe's processes only need normalize.
    import torchmetrics

    class MinMax(torchmetrics.Metric):
        """anomalib 0.7 ``anomalib.utils.metrics.MinMax``: a torchmetrics metric, two passes."""

        full_state_update: bool = True

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.add_state("min", torch.tensor(float("inf")), persistent=True)
            self.add_state("max", torch.tensor(float("-inf")), persistent=True)
            self.min = torch.tensor(float("inf"))
            self.max = torch.tensor(float("-inf"))

        def update(self, predictions: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            del args, kwargs
            self.max = torch.max(self.max, torch.max(predictions))
            self.min = torch.min(self.min, torch.min(predictions))

        def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.min, self.max

    return MinMax


def MinMax(**kwargs: Any) -> Any:  # noqa: N802 - stands in for anomalib's class
    """A new anomalib 0.7 ``MinMax`` metric (a ``torchmetrics.Metric``)."""
    return _minmax_class()(**kwargs)


class MinMaxNormalizationCallback:
    """The per-batch work of anomalib 0.7's ``MinMaxNormalizationCallback``.

    Lightning's ``Callback`` base adds nothing to the per-batch cost, so it is left out.
    """

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: dict[str, Any], *args: Any
    ) -> None:
        del trainer, args
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
        self, trainer: Any, pl_module: Any, outputs: dict[str, Any], *args: Any
    ) -> None:
        del trainer, args
        self._normalize_batch(outputs, pl_module)

    @staticmethod
    def _normalize_batch(outputs: dict[str, Any], pl_module: Any) -> None:
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
