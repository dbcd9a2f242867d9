"""Statistics across JAX processes (``jax.distributed``).

Each process validates its own part of the data; these functions merge the statistics so
that every process normalizes with the global min and max. Both are collectives: call them
on every process, in the same order, after ``jax.distributed.initialize``.

- ``MinMaxNormalizationHook(reducer="auto")`` (the default) calls
  ``allreduce_across_processes`` by itself at ``on_validation_epoch_end`` when
  ``jax.process_count() > 1``.
- ``reduce_stats`` is for loops that fold ``NormalizationStats`` or ``MinMax`` themselves.

Within one process, several devices need none of this: a ``jit`` over sharded inputs, or
``MinMax.reduce(axis_name)`` inside ``shard_map``, already gives global statistics.
"""

from jaxnorm._src.distributed import allreduce_across_processes as allreduce_across_processes
from jaxnorm._src.distributed import reduce_stats as reduce_stats

__all__ = ["allreduce_across_processes", "reduce_stats"]
