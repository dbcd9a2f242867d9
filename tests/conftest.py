"""Test session set-up: 8 simulated CPU devices for the whole session.

The flag must be set before jax initialises its backends, so it lives here, before any
test module imports jax. Single-device tests simply use the default device.
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
    devs = jax.devices()
    assert len(devs) == N_DEVICES, (
        f"expected {N_DEVICES} simulated CPU devices, got {len(devs)}: was jax imported "
        "before tests/conftest.py set XLA_FLAGS?"
    )
    return devs


# CI runs a fixed set of examples so that a red run is reproducible; locally they vary.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
