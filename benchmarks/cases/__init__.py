"""The benchmark cases, by the name ``--cases`` takes, in the order they run.

Each case module has ``KEY``, ``TITLE`` and ``run(config) -> CaseResult``. Modules are
imported on demand: the memory probe's subprocesses must not pay for torch and the rest.
"""

from __future__ import annotations

import importlib
from types import ModuleType

CASES: dict[str, str] = {
    "normalize": "benchmarks.cases.normalize",
    "minmax": "benchmarks.cases.minmax",
    "shim": "benchmarks.cases.lightning_shim",
    "ragged": "benchmarks.cases.ragged",
    "memory": "benchmarks.cases.memory",
    "pipeline": "benchmarks.cases.pipeline",
    "overhead": "benchmarks.cases.overhead",
    "fused": "benchmarks.cases.fused",
    "load": "benchmarks.cases.loadtest",
    # anomalib 2's PostProcessor: runs where anomalib >= 2 is installed (make bench-anomalib2).
    "postprocessor": "benchmarks.cases.postprocessor",
    "threshold": "benchmarks.cases.threshold",
    "loop": "benchmarks.cases.lightning_loop",
}


def load(key: str) -> ModuleType:
    """The module of case ``key``."""
    return importlib.import_module(CASES[key])
