"""``torch_compat.anomalib1`` without anomalib 1.x: an ImportError that says what to install.

The main environment has no anomalib; other majors are simulated with a stand-in module.
The real anomalib 1.2.0 and 1.1.0 are tested in tests_anomalib1/ (`make test-anomalib1`).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

pytest.importorskip("torch")

MODULE = "torch_compat.anomalib1"
INSTALL = r'needs anomalib 1.x: `pip install "anomalib\[core\]==1.2.0"`'


@pytest.fixture
def fresh(monkeypatch):
    """Imports torch_compat.anomalib1 anew, and forgets it (and any stand-in) afterwards."""
    for name in [m for m in sys.modules if m == MODULE or m.startswith("anomalib")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    sys.modules.pop(MODULE, None)


def _import():
    return importlib.import_module(MODULE)


@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is not None, reason="anomalib is installed here"
)
def test_without_anomalib_says_what_to_install(fresh):
    with pytest.raises(ImportError, match=INSTALL) as info:
        _import()
    message = str(info.value)
    assert "No module named 'anomalib'" in message
    # where users of the other majors go
    assert "torch_compat.MinMaxNormalizationCallback" in message
    assert "torch_compat.anomalib2.PostProcessor" in message
    assert MODULE not in sys.modules


@pytest.mark.parametrize("version", ["0.7.0", "2.7.0", "dev"])
def test_another_anomalib_says_what_to_install(fresh, monkeypatch, version):
    fake = types.ModuleType("anomalib")
    fake.__version__ = version
    fake.__file__ = "/stand-in/anomalib/__init__.py"
    monkeypatch.setitem(sys.modules, "anomalib", fake)
    with pytest.raises(ImportError, match=INSTALL) as info:
        _import()
    assert f"Found anomalib {version} at /stand-in/anomalib" in str(info.value)
