"""The jaxnorm demo, ``python -m jaxnorm.demo``: an anomaly detector from training to
normalized test scores.

It trains a small Flax NNX autoencoder on synthetic textured surfaces, collects min/max
statistics during validation with ``jaxnorm.MinMaxNormalizationHook``, sets F1-optimal
thresholds, and tests with normalized outputs. See ``python -m jaxnorm.demo --help``.
"""

from jaxnorm.demo.run import main as main
