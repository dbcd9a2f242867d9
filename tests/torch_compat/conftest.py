"""Fixtures of the torch_compat tests."""

from __future__ import annotations

import pytest
import torch

import torch_compat


@pytest.fixture
def has_plans():
    """Whether this jaxlib has the direct DLPack calls the steady path takes (jaxlib 0.6, the
    floor, has not: there every test batch takes the full path)."""
    from torch_compat import _dlpack

    torch_compat.to_jax(torch.zeros(1))  # finds the direct import, as a first batch does
    return _dlpack.batch_device_ok(torch.device("cpu"))


@pytest.fixture
def batch_exchange(has_plans):
    """Skips where this jaxlib lacks the direct DLPack calls the steady path takes."""
    if not has_plans:
        pytest.skip("this jaxlib has no direct DLPack calls: every test batch takes the full path")
