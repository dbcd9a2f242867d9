"""Test session set-up: 8 simulated CPU devices for the whole session.

The flag must be set before jax initialises its backends, so it lives here, before any
test module imports jax. Single-device tests simply use the default device.

The sharded tests take the ``devices`` fixture: the 8 CPU devices, asked for by platform,
so they run the same where the default backend is a GPU (``JAX_PLATFORMS=cuda,cpu``, as in
benchmarks/gpu/gpu_check.sh). While such a test runs, jax's default device is the first CPU
device too, so the arrays it makes without placing them (a hook's state, ``MinMax.empty()``)
sit with the sharded ones instead of on the GPU.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

N_DEVICES = 8


@pytest.fixture(scope="session")
def devices():
    """The 8 simulated CPU devices, whatever the default backend is."""
    devs = jax.devices("cpu")
    assert len(devs) == N_DEVICES, (
        f"expected {N_DEVICES} simulated CPU devices, got {len(devs)}: was jax imported "
        "before tests/conftest.py set XLA_FLAGS?"
    )
    return devs


@pytest.fixture(autouse=True)
def _cpu_default_for_sharded_tests(request):
    """Tests on the CPU devices make their other arrays there too (see the module doc)."""
    if "devices" not in request.fixturenames or jax.default_backend() == "cpu":
        yield
        return
    with jax.default_device(request.getfixturevalue("devices")[0]):
        yield


# CI runs a fixed set of examples so that a red run is reproducible; locally they vary.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
