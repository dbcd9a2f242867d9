"""A stand-in for an anomalib 1.x model, built from anomalib's own classes, for the tests that
drive the callbacks by hand (``test_caches.py``, ``test_stateful_callback.py``).

``Model`` is a real ``AnomalyModule`` (no network): its ``load_state_dict`` replaces the
thresholds and the normalization metrics with new instances as anomalib's does, its
``state_dict`` carries anomalib's ``*_class`` keys, and its thresholds are anomalib's
``F1AdaptiveThreshold`` (torchmetrics states, converted by ``module.to(dtype)`` as a model's
are). ``PATHS`` names, for the installed design, the tensors each statistic lives in.
"""

from __future__ import annotations

import common
import numpy as np
import torch
from anomalib import LearningType
from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
from anomalib.metrics.threshold import F1AdaptiveThreshold
from anomalib.models.components import AnomalyModule

from tests import tensor_writes

PER_OUTPUT = common.expected_design() == "per-output"
IMAGE_T, PIXEL_T = "image_threshold.value", "pixel_threshold.value"
_PREFIX = "normalization_metrics."
# Where each statistic lives: one MinMax per output (1.1.1+), or one shared MinMax.
ENTRIES = ("pred_scores", "anomaly_maps", "box_scores") if PER_OUTPUT else ("",)
IMAGE, PIXEL = (
    (f"{_PREFIX}pred_scores.", f"{_PREFIX}anomaly_maps.") if PER_OUTPUT else (_PREFIX, _PREFIX)
)
BOX = f"{_PREFIX}box_scores." if PER_OUTPUT else _PREFIX
STATS = tuple(dict.fromkeys(f"{p}{s}" for p in (IMAGE, PIXEL, BOX) for s in ("min", "max")))
EMPTY = (np.inf, -np.inf)


class Metrics:
    """``image_metrics`` / ``pixel_metrics`` as far as the callbacks use them."""

    threshold = None

    def set_threshold(self, value: float) -> None:
        self.threshold = value


class Model(AnomalyModule):
    """An ``AnomalyModule`` with thresholds and metrics and no network."""

    learning_type = LearningType.ONE_CLASS
    trainer_arguments: dict = {}  # noqa: RUF012 - AnomalyModule's abstract property

    def __init__(self, image_t: float = 0.25, pixel_t: float = 0.75) -> None:
        super().__init__()
        self.image_threshold = F1AdaptiveThreshold(image_t)
        self.pixel_threshold = F1AdaptiveThreshold(pixel_t)
        self.image_metrics = Metrics()
        self.pixel_metrics = Metrics()

    def attach(self) -> Model:
        """anomalib's own ``normalization_metrics`` (its callback's ``setup``)."""
        _MinMaxNormalizationCallback().setup(None, self, "fit")
        return self


def tensor(module: torch.nn.Module, path: str) -> torch.Tensor:
    owner, name = tensor_writes.resolve(module, path)
    return getattr(owner, name)


def value(module: torch.nn.Module, path: str) -> float:
    return tensor_writes.as_float(tensor(module, path))


def pair(module: torch.nn.Module, prefix: str) -> tuple[float, float]:
    return value(module, prefix + "min"), value(module, prefix + "max")


def values_of(module: torch.nn.Module) -> dict[str, float]:
    """Every threshold and statistic ``module`` holds now, by path, as Python floats."""
    return {path: value(module, path) for path in (IMAGE_T, PIXEL_T, *STATS)}
