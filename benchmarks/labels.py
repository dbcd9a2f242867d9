"""The contender and row-group names that more than one module uses, defined once.

Cases name their rows with these, and ``benchmarks.headlines`` finds the published figures by
them. A name that only one case uses lives in that case. Stored results keep the names they
were measured with: after a rename here, publishing fails on a stored run that still has
the old name (``headlines.MissingRow``) until the case is run again, instead of dropping
the figure.
"""

from __future__ import annotations

# anomalib 0.7's code (benchmarks.anomalib_ref), the baseline of every headline.
ANOMALIB_NORMALIZE = "anomalib 0.7 normalize (torch eager)"
ANOMALIB_UPDATE = "anomalib 0.7 MinMax.update (torch)"
ANOMALIB_CALLBACK = "anomalib 0.7 callback"
# the same callback, in the `shim` case (its `_normalize_batch` alone) and the `ragged` case.
ANOMALIB_NORMALIZE_BATCH = "anomalib 0.7 callback _normalize_batch"
ANOMALIB_CALLBACK_EAGER = "anomalib 0.7 callback (torch eager)"

# jaxnorm.
NORMALIZE = "jaxnorm.normalize"
UPDATE = "MinMax.empty().update(x)"
UPDATE_CHAINED = "MinMax.update (state chained)"
HOOK = "jaxnorm hook"
HOOK_CLASS = "jaxnorm.MinMaxNormalizationHook"

# torch_compat.
SHIM = "torch_compat callback"
SHIM_TEST_BATCH = "torch_compat callback on_test_batch_end"

# anomalib 2's PostProcessor, and ours (the `postprocessor` case).
ANOMALIB2_POSTPROCESSOR = "anomalib PostProcessor"
POSTPROCESSOR = "torch_compat.anomalib2.PostProcessor"

# The `loop` case's run without a callback, which the others are measured against.
NO_CALLBACK = "no callback"

# Row groups.
MAPS_256 = (32, 1, 256, 256)
TINY_MAPS = (32, 1, 8, 8)


def array_group(shape: tuple[int, ...], dtype: str) -> str:
    """The group of one array configuration, e.g. ``"(32, 1, 256, 256) float32"``."""
    return f"{shape} {dtype}"


def batch_group(maps: tuple[int, ...]) -> str:
    """What one test or validation batch holds: 32 image scores and maps of ``maps``."""
    return f"32 scores + {maps} maps"


def loop_group(phase: str, batches: int, maps: tuple[int, ...]) -> str:
    """A pipelined loop of ``batches`` batches: ``phase`` is ``"test"`` or ``"validation"``."""
    return f"{phase}, {batches} batches of {batch_group(maps)}"


FRESH = "fresh tensors every batch: "
SHIM_MAPS_GROUP = "maps (32,1,256,256) + 32 scores"
