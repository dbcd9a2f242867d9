"""jaxnorm: min-max normalization of anomaly scores in JAX.

A port of anomalib's ``MinMaxNormalizationCallback``: collect the min and max of the scores
during validation, then map every test or predict score to [0, 1] with the decision threshold
at 0.5.
"""

from jaxnorm._src.random_state import global_random_state_kept as _kept

# Importing jax draws from numpy's global random state: the imports below leave it, and
# Python's, as they were.
with _kept():
    from jaxnorm import nnx as nnx
    from jaxnorm._src.errors import NO_VALUES_MESSAGE as NO_VALUES_MESSAGE
    from jaxnorm._src.errors import NonFiniteScoresError as NonFiniteScoresError
    from jaxnorm._src.errors import StatisticsMissingError as StatisticsMissingError
    from jaxnorm._src.f1_state import F1AdaptiveThreshold as F1AdaptiveThreshold
    from jaxnorm._src.f1_threshold import f1_adaptive_threshold as f1_adaptive_threshold
    from jaxnorm._src.hook import MinMaxNormalizationHook as MinMaxNormalizationHook
    from jaxnorm._src.hook import Reducer as Reducer
    from jaxnorm._src.minmax import MinMax as MinMax
    from jaxnorm._src.normalize import normalize as normalize
    from jaxnorm._src.normalize import normalize_outputs as normalize_outputs
    from jaxnorm._src.stats import NormalizationStats as NormalizationStats
    from jaxnorm._src.stats import update_stats as update_stats

__version__ = "0.1.0"

__all__ = [
    "NO_VALUES_MESSAGE",
    "MinMax",
    "MinMaxNormalizationHook",
    "NonFiniteScoresError",
    "NormalizationStats",
    "Reducer",
    "StatisticsMissingError",
    "nnx",
    "normalize",
    "normalize_outputs",
    "update_stats",
]
