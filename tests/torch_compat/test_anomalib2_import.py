"""``torch_compat.anomalib2`` without anomalib >= 2: an ImportError that says what to install.

The main environment has no anomalib; anomalib 0.x is simulated with a stand-in module.
The real anomalib 2.7.0 is tested in tests_anomalib2/ (`make test-anomalib2`).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

pytest.importorskip("torch")

MODULE = "torch_compat.anomalib2"


@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is not None, reason="anomalib is installed here"
)
def test_without_anomalib_says_what_to_install(fresh_import):
    with pytest.raises(ImportError, match=r'pip install "anomalib\[cpu\]>=2"') as info:
        fresh_import()
    assert "MinMaxNormalizationCallback" in str(info.value)  # the 0.x route
    assert "No module named 'anomalib'" in str(info.value)
    assert MODULE not in sys.modules


@pytest.mark.parametrize("version", ["0.7.0", "1.2.0", "dev"])
def test_anomalib_before_2_says_what_to_install(fresh_import, stand_in_anomalib, version):
    stand_in_anomalib(version)
    with pytest.raises(
        ImportError, match=r'needs anomalib >= 2: `pip install "anomalib\[cpu\]'
    ) as info:
        fresh_import()
    assert f"Found anomalib {version} at /stand-in/anomalib" in str(info.value)
    assert "torch_compat.MinMaxNormalizationCallback" in str(info.value)


@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is not None, reason="anomalib is installed here"
)
def test_the_postprocessor_benchmark_skips_without_anomalib_2():
    from benchmarks.cases import postprocessor
    from benchmarks.cases.base import RunConfig

    result = postprocessor.run(RunConfig.make(quick=True))
    assert result.skipped and "make bench-anomalib2" in result.skipped
    assert result.error is None and result.rows == [] and result.targets == []
