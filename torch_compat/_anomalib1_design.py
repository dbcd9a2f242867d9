"""Which of anomalib 1.x's two normalization designs is installed, asked of anomalib's own
callback, and what its per-output metrics look like.

- ``SHARED`` (1.0.x, 1.1.0, 1.1.3): ``pl_module.normalization_metrics`` is one ``MinMax``, fed
  by the first of ``anomaly_maps``, ``box_scores``, ``pred_scores``, never reset.
- ``PER_OUTPUT`` (1.1.1, 1.1.2, 1.2.0, anomalib #2130): a ``MetricCollection`` of one
  ``MinMax`` per output, reset at each validation epoch start.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Mapping
from typing import Any

import torch
from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
from anomalib.metrics import MinMax
from torchmetrics import MetricCollection

from torch_compat._minmax import ATTRIBUTE

SHARED = "shared"
PER_OUTPUT = "per-output"
KEYS = ("anomaly_maps", "box_scores", "pred_scores")  # the per-output collection's


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
    if isinstance(metrics, MetricCollection) and sorted(metrics.keys()) == sorted(KEYS):
        design, watched = PER_OUTPUT, metrics["pred_scores"]
    elif isinstance(metrics, MinMax):
        design, watched = SHARED, metrics
    else:
        raise ImportError(
            f"anomalib's _MinMaxNormalizationCallback.setup attached {type(metrics).__name__} "
            f"({metrics!r}), neither one MinMax nor a MetricCollection of {KEYS}; "
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


def check_collection(metrics: Any) -> None:
    """anomalib's per-output collection, with a ``MinMax`` for each output (anomalib's
    ``setup`` checks the same; this names what a hand-made attribute lacks)."""
    if not isinstance(metrics, MetricCollection) or any(k not in metrics for k in KEYS):
        raise TypeError(
            f"pl_module.{ATTRIBUTE} is a {type(metrics).__qualname__}"
            + (f" with keys {sorted(metrics.keys())}" if isinstance(metrics, Mapping) else "")
            + f"; anomalib {_version()} keeps a MetricCollection of anomalib.metrics.MinMax "
            f"keyed {list(KEYS)} there. Delete the attribute (the callback then attaches "
            "anomalib's), or load a checkpoint saved with this anomalib."
        )


def _version() -> str:
    import anomalib

    return anomalib.__version__
