"""Flax NNX adapters of jaxnorm: ``MinMaxMetric`` for ``nnx.MultiMetric``."""

from jaxnorm._src.nnx_metric import MinMaxMetric as MinMaxMetric
