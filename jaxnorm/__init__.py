"""jaxnorm: min-max normalization of anomaly scores in JAX.

A port of anomalib's ``MinMaxNormalizationCallback``: collect the min and max of the scores
during validation, then map every test or predict score to [0, 1] with the decision threshold
at 0.5.
"""

from jaxnorm._src.minmax import MinMax as MinMax
from jaxnorm._src.normalize import normalize as normalize

__version__ = "0.1.0"
