"""torch_compat: anomalib's ``MinMaxNormalizationCallback`` for PyTorch Lightning, on jaxnorm.

A drop-in swap for anomalib 0.x's callback::

  from torch_compat import MinMaxNormalizationCallback   # was anomalib.utils.callbacks

``torch_compat.MinMaxNormalizationCallback`` subclasses ``pytorch_lightning.Callback`` (anomalib
0.x's namespace) when ``pytorch_lightning`` is installed, else ``lightning.pytorch.Callback``.
A Trainer accepts callbacks of its own namespace only: with ``lightning.pytorch`` Trainers
(``import lightning as L``) use ``torch_compat.lightning.MinMaxNormalizationCallback``; the
explicit ``torch_compat.pytorch_lightning.MinMaxNormalizationCallback`` exists too. All of them
run the same code.
"""

from __future__ import annotations

import importlib.util
import os as _os
from typing import TYPE_CHECKING, Any

from torch_compat._memory import PREALLOCATE as _PREALLOCATE
from torch_compat._memory import PreallocationWarning as PreallocationWarning
from torch_compat._memory import disable_preallocation as _disable_preallocation
from torch_compat._memory import warn_if_preallocated as _warn_if_preallocated

# Before jax can start a GPU client: XLA would otherwise take most of the GPU's memory.
_user_set_preallocate = _disable_preallocation()

# Importing jax (through jaxnorm), torch or torchmetrics must not move the user's seeded
# random numbers: numpy's and Python's global states are put back as they were.
from jaxnorm._src.random_state import global_random_state_kept as _kept  # noqa: E402  isort: skip

# The modules of the `torch` extra (`pip install "jaxnorm[torch]"`); jaxnorm needs none.
_TORCH_EXTRA = ("torch", "torchmetrics")

with _kept():
    try:
        from torch_compat._allreduce import allreduce_stats as allreduce_stats
        from torch_compat._dlpack import HostCopyWarning as HostCopyWarning
        from torch_compat._dlpack import to_jax as to_jax
        from torch_compat._dlpack import to_torch as to_torch
        from torch_compat._dlpack_check import FastPathWarning as FastPathWarning
        from torch_compat._minmax import MinMax as MinMax
    except ModuleNotFoundError as error:
        if error.name not in _TORCH_EXTRA:
            raise
        if not _user_set_preallocate:  # a failed import leaves the environment as it was
            _os.environ.pop(_PREALLOCATE, None)
        # Name every module of the extra that is missing, not only the first one imported.
        missing = [m for m in _TORCH_EXTRA if importlib.util.find_spec(m) is None]
        missing = missing or [error.name]
        raise ImportError(
            f"torch_compat needs {' and '.join(map(repr, missing))}: "
            + ("it is" if len(missing) == 1 else "they are")
            + " not installed"
            + ("." if "torch" in missing else " (torch is).")
            + ' Install jaxnorm with its torch extra, `pip install "jaxnorm[torch]"` (from a '
            'checkout: `pip install -e ".[torch]"`), which brings torch, pytorch-lightning and '
            "torchmetrics. jaxnorm itself works without them."
        ) from error

_warn_if_preallocated(_user_set_preallocate)

if TYPE_CHECKING:
    from torch_compat.pytorch_lightning import (
        MinMaxNormalizationCallback as MinMaxNormalizationCallback,
    )

__all__ = [
    "FastPathWarning",
    "HostCopyWarning",
    "MinMax",
    "MinMaxNormalizationCallback",
    "PreallocationWarning",
    "allreduce_stats",
    "to_jax",
    "to_torch",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: only the Lightning namespace the user picked gets imported.
    if name == "MinMaxNormalizationCallback":
        if importlib.util.find_spec("pytorch_lightning") is not None:
            from torch_compat.pytorch_lightning import MinMaxNormalizationCallback
        elif importlib.util.find_spec("lightning") is not None:
            from torch_compat.lightning import MinMaxNormalizationCallback
        else:
            raise ImportError(
                "torch_compat.MinMaxNormalizationCallback needs PyTorch Lightning: "
                '`pip install "jaxnorm[torch]"` brings pytorch-lightning (or '
                "`pip install lightning` for the `lightning.pytorch` namespace)."
            )
        globals()[name] = MinMaxNormalizationCallback
        return MinMaxNormalizationCallback
    raise AttributeError(f"module 'torch_compat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
