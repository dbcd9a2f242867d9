"""Adversarial inputs to the core: placements, dtypes, layouts and edge values.

Values are checked against the plain-numpy reference in tests/reference.py; recompiles with
the compile counter.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from jaxnorm._src.compile_counter import count_compiles
from tests import reference

# -- one compilation per layout, whatever the values' placement ----------------------------


_PLACEMENTS = ("device 0", "device 1", "sharded")


def _committed_placements(devices):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    return {
        "device 0": jax.sharding.SingleDeviceSharding(devices[0]),
        "device 1": jax.sharding.SingleDeviceSharding(devices[1]),
        "sharded": NamedSharding(mesh, P("data")),
    }


@pytest.mark.parametrize("where", _PLACEMENTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_hook_fold_compiles_once_for_committed_values(devices, where, accumulate):
    # Committed values (device_put to a device, DLPack imports, a sharded step) used to
    # compile the fold twice: once for the fresh state, once for the state it returned
    # (committed where the values are), and again after each epoch start under accumulate.
    sharding = _committed_placements(devices)[where]
    rng = np.random.default_rng(0)
    hook = jaxnorm.MinMaxNormalizationHook(accumulate=accumulate)
    # a layout no other test uses, so the first fold compiles here
    shape = (8, 3, 5, 7 + 3 * accumulate + _PLACEMENTS.index(where))
    seen = []
    with count_compiles() as log:
        for _ in range(2):
            hook.on_validation_epoch_start()
            for _ in range(3):
                x = rng.normal(size=shape).astype(np.float32)
                seen.append(x)
                hook.on_validation_batch_end({"anomaly_maps": jax.device_put(x, sharding)})
            hook.on_validation_epoch_end()
    folds = [n for n in log.names if "fold" in n or n == "?"]
    assert len(folds) <= 1, log.names
    lo, hi = reference.min_max(*(seen if accumulate else seen[3:]))
    assert hook.host_stats()["pixel"] == (lo, hi)


@pytest.mark.parametrize("where", _PLACEMENTS)
def test_minmax_update_compiles_once_for_committed_values(devices, where):
    sharding = _committed_placements(devices)[where]
    rng = np.random.default_rng(1)
    shape = (8, 11, 3 + _PLACEMENTS.index(where))
    xs = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    stats = jaxnorm.MinMax.empty()
    with count_compiles() as log:
        for x in xs:
            stats = stats.update(jax.device_put(x, sharding))
    assert log.count <= 1, log.names
    lo, hi = reference.min_max(*xs)
    assert (float(stats.min), float(stats.max)) == (lo, hi)
