"""What differs between the supported versions, for the tests: one place, so that the suite
runs on the floors of ci/floor-constraints.txt (`make test-floor`) as on the newest releases."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from pathlib import Path

import jax
import jax.export  # noqa: F401 - `import jax` imports it only from jax 0.7 on
import pytest
from flax import nnx

try:
    shard_map = jax.shard_map  # jax >= 0.6.1
except AttributeError:  # pragma: no cover - depends on the jax
    from jax.experimental.shard_map import shard_map  # noqa: F401


@contextlib.contextmanager
def enable_x64(on: bool = True):
    """``jax.enable_x64(on)`` (jax >= 0.7), ``jax.experimental.enable_x64`` before."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(on):
            yield
    else:  # pragma: no cover - depends on the jax
        from jax.experimental import disable_x64
        from jax.experimental import enable_x64 as _enable_x64

        with _enable_x64() if on else disable_x64():
            yield


# flax >= 0.11's MultiMetric.update routes ``mask={"<metric name>": mask}`` to one metric;
# older flax passes the dict itself to every metric.
MULTIMETRIC_ROUTES_MASKS = "mask" in inspect.getsource(nnx.MultiMetric.update)
needs_multimetric_mask_routing = pytest.mark.skipif(
    not MULTIMETRIC_ROUTES_MASKS,
    reason="this flax's MultiMetric.update does not route per-metric masks (flax >= 0.11 does)",
)

# The `lightning` distribution (the `lightning.pytorch` namespace) is optional: the floor
# environment, the anomalib 0.x user's stack, has `pytorch_lightning` only.
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
needs_lightning = pytest.mark.skipif(
    not HAS_LIGHTNING, reason="the `lightning` distribution is not installed (make test-floor)"
)
LIGHTNING_NAMESPACES = [
    "pytorch_lightning",
    pytest.param("lightning.pytorch", marks=needs_lightning),
]


def jax_import_draws_from_numpy() -> bool:
    """Whether this jax's import calls ``np.random`` (jax >= 0.6.1's k8s cluster module)."""
    source = Path(jax.__file__).parent / "_src" / "clusters" / "k8s_cluster.py"
    return source.is_file() and "np.random." in source.read_text()


# For tests about the callback, not the namespace: `lightning.pytorch` where installed.
ANY_NAMESPACE = "lightning.pytorch" if HAS_LIGHTNING else "pytorch_lightning"
