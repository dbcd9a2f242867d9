"""Fixtures of the torch_compat tests (torch is imported where a fixture runs, so that this
file loads where it is not installed)."""

from __future__ import annotations

import importlib
import sys
import types

import pytest


@pytest.fixture
def has_plans():
    """Whether this jaxlib has the direct DLPack calls the steady path takes (jaxlib 0.6, the
    floor, has not: there every test batch takes the full path)."""
    import torch

    import torch_compat
    from torch_compat import _dlpack

    torch_compat.to_jax(torch.zeros(1))  # finds the direct import, as a first batch does
    return _dlpack.batch_device_ok(torch.device("cpu"))


@pytest.fixture
def batch_exchange(has_plans):
    """Skips where this jaxlib lacks the direct DLPack calls the steady path takes."""
    if not has_plans:
        pytest.skip("this jaxlib has no direct DLPack calls: every test batch takes the full path")


@pytest.fixture
def fresh_import(request, monkeypatch):
    """Imports the test module's ``MODULE`` (a public module that checks anomalib's version
    at import) anew: it and anomalib (or a stand-in) are dropped from ``sys.modules`` first,
    and it is forgotten afterwards. Returns the import, a function."""
    module = request.module.MODULE
    for name in [m for m in sys.modules if m == module or m.startswith("anomalib")]:
        monkeypatch.delitem(sys.modules, name)
    yield lambda: importlib.import_module(module)
    sys.modules.pop(module, None)


@pytest.fixture
def stand_in_anomalib(monkeypatch):
    """Installs a stand-in ``anomalib`` of a given version (another major than the module
    under test wants); returns the function that does it."""

    def install(version: str) -> None:
        fake = types.ModuleType("anomalib")
        fake.__version__ = version
        fake.__file__ = "/stand-in/anomalib/__init__.py"
        monkeypatch.setitem(sys.modules, "anomalib", fake)

    return install
