"""Flax NNX adapters of jaxnorm: ``MinMaxMetric`` and ``F1AdaptiveThresholdMetric`` for
``nnx.MultiMetric``."""

from jaxnorm._src.nnx_f1_metric import F1AdaptiveThresholdMetric as F1AdaptiveThresholdMetric
from jaxnorm._src.nnx_metric import MinMaxMetric as MinMaxMetric
