"""Where a running state lives: on the devices of the committed values folded into it.

``jit`` keys its cache on each argument's sharding and on whether it is committed (placed
on purpose, e.g. by ``jax.device_put(x, device)``, DLPack or a sharded step) or not. A fresh
state (``MinMax.empty()``, the hook's reset) is uncommitted on the default device. Folding
committed values into it returns a state committed where the values are, so the next fold
sees a differently placed state and compiles the same function a second time. Placing the
state where the fold would put it, before the first fold, keeps it at one compilation.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxnorm._src import validation


def target(values: Iterable) -> jax.sharding.Sharding | None:
    """The placement a fold of ``values`` gives its replicated (scalar) state, or ``None``
    when no value is committed (the fold then leaves the state uncommitted)."""
    for x in values:
        if not isinstance(x, jax.Array) or validation.is_tracer(x) or not x.committed:
            continue
        if not x.is_fully_addressable:
            return None  # a global array across processes: jit places the state itself
        sharding = x.sharding
        if isinstance(sharding, SingleDeviceSharding):
            return sharding
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
        return None  # other shardings (pmap's): left as they come
    return None


def place(state, sharding: jax.sharding.Sharding | None):
    """``state`` with every leaf committed to ``sharding`` (a transfer only when one is not)."""
    if sharding is None:
        return state
    leaves = jax.tree.leaves(state)
    if all(
        isinstance(leaf, jax.Array)
        and not validation.is_tracer(leaf)
        and leaf.committed
        and leaf.sharding == sharding
        for leaf in leaves
    ):
        return state
    if any(validation.is_tracer(leaf) for leaf in leaves):
        return state
    return jax.device_put(state, sharding)
