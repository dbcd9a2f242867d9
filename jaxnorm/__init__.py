"""jaxnorm: min-max normalization of anomaly scores in JAX.

A port of anomalib's ``MinMaxNormalizationCallback``: collect the min and max of the scores
during validation, then map every test or predict score to [0, 1] with the decision threshold
at 0.5.
"""

import random as _random

import numpy as _np

# Importing jax draws from numpy's global random state (a module-level np.random call in
# jax's cluster detection). A user who seeds numpy, then imports us, must get the numbers
# they would get without us: both global states are put back as they were.
_np_state, _py_state = _np.random.get_state(), _random.getstate()
try:
    from jaxnorm import nnx as nnx
    from jaxnorm._src.errors import NO_VALUES_MESSAGE as NO_VALUES_MESSAGE
    from jaxnorm._src.errors import NonFiniteScoresError as NonFiniteScoresError
    from jaxnorm._src.errors import StatisticsMissingError as StatisticsMissingError
    from jaxnorm._src.hook import MinMaxNormalizationHook as MinMaxNormalizationHook
    from jaxnorm._src.hook import Reducer as Reducer
    from jaxnorm._src.minmax import MinMax as MinMax
    from jaxnorm._src.normalize import normalize as normalize
    from jaxnorm._src.outputs import NormalizationStats as NormalizationStats
    from jaxnorm._src.outputs import normalize_outputs as normalize_outputs
    from jaxnorm._src.outputs import update_stats as update_stats
finally:
    _np.random.set_state(_np_state)
    _random.setstate(_py_state)
    del _np_state, _py_state

__version__ = "0.1.0"
