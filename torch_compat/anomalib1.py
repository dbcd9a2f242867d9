"""anomalib 1.x's min-max normalization callback, with its statistics computed by jaxnorm.

A drop-in for the callback that anomalib 1.x's ``Engine`` adds by itself
(``anomalib.callbacks.normalization._MinMaxNormalizationCallback``)::

  from torch_compat.anomalib1 import MinMaxNormalizationCallback

  engine = Engine(normalization=MinMaxNormalizationCallback())

Needs anomalib 1.x (1.0.0 to 1.2.0, with ``lightning``); for anomalib 0.x use
``torch_compat.MinMaxNormalizationCallback``, for anomalib >= 2
``torch_compat.anomalib2.PostProcessor``.
"""

from __future__ import annotations

_INSTALL = (
    'torch_compat.anomalib1 needs anomalib 1.x: `pip install "anomalib[core]==1.2.0"` (the '
    "newest 1.x; anomalib 1.0.0 to 1.2.0 work), beside torch < 2.6. For anomalib 0.x use "
    "torch_compat.MinMaxNormalizationCallback, for anomalib >= 2 "
    "torch_compat.anomalib2.PostProcessor."
)


def _anomalib_major() -> int | None:
    import anomalib

    head = str(getattr(anomalib, "__version__", "0")).split(".")[0]
    return int(head) if head.isdigit() else None


try:
    _major = _anomalib_major()
except ImportError as e:
    raise ImportError(f"{_INSTALL} (importing anomalib failed: {e})") from e
if _major != 1:
    import anomalib as _anomalib

    raise ImportError(
        f"{_INSTALL} Found anomalib {getattr(_anomalib, '__version__', '?')} at "
        f"{getattr(_anomalib, '__file__', '?')}."
    )

try:
    from anomalib.callbacks.normalization import _MinMaxNormalizationCallback  # noqa: F401
except ImportError as e:  # pragma: no cover - a broken anomalib install
    raise ImportError(f"{_INSTALL} (importing anomalib.callbacks failed: {e})") from e

from jaxnorm._src.random_state import global_random_state_kept as _kept  # noqa: E402

with _kept():
    from torch_compat._anomalib1 import MinMaxNormalizationCallback as MinMaxNormalizationCallback
    from torch_compat._anomalib1_boxes import BoxScoresWarning as BoxScoresWarning
    from torch_compat._anomalib1_design import PER_OUTPUT as PER_OUTPUT
    from torch_compat._anomalib1_design import SHARED as SHARED
    from torch_compat._anomalib1_design import detect_design as detect_design

__all__ = [
    "PER_OUTPUT",
    "SHARED",
    "BoxScoresWarning",
    "MinMaxNormalizationCallback",
    "detect_design",
]
