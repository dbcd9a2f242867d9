"""``torch_compat.anomalib1`` without anomalib 1.x: an ImportError that says what to install.

The main environment has no anomalib; other majors are simulated with a stand-in module.
The real anomalib 1.2.0 and 1.1.0 are tested in tests_anomalib1/ (`make test-anomalib1`).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

pytest.importorskip("torch")

MODULE = "torch_compat.anomalib1"
INSTALL = r'needs anomalib 1.x: `pip install "anomalib\[core\]==1.2.0"`'


@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is not None, reason="anomalib is installed here"
)
def test_without_anomalib_says_what_to_install(fresh_import):
    with pytest.raises(ImportError, match=INSTALL) as info:
        fresh_import()
    message = str(info.value)
    assert "No module named 'anomalib'" in message
    # where users of the other majors go
    assert "torch_compat.MinMaxNormalizationCallback" in message
    assert "torch_compat.anomalib2.PostProcessor" in message
    assert MODULE not in sys.modules


@pytest.mark.parametrize("version", ["0.7.0", "2.7.0", "dev"])
def test_another_anomalib_says_what_to_install(fresh_import, stand_in_anomalib, version):
    stand_in_anomalib(version)
    with pytest.raises(ImportError, match=INSTALL) as info:
        fresh_import()
    assert f"Found anomalib {version} at /stand-in/anomalib" in str(info.value)
