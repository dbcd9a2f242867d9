"""Statistics written into anomalib 1.x's ``MinMax`` metrics as anomalib's own updates leave
them, dtype included.

anomalib's callback updates a metric at each validation batch that feeds it:
``state = torch.max(state, torch.max(batch))``, two 0-d tensors, so the state's dtype becomes
``torch.promote_types(state.dtype, batch.dtype)`` (a ``bfloat16`` state of a converted module
fed ``float32`` maps becomes ``float32``), and a metric no batch fed keeps its dtype. The
adapter folds in jaxnorm and writes once, at the epoch's end, so it notes the dtypes each
metric was fed (``note_fed``, host metadata only) and writes with the dtype anomalib's updates
would have left (``store``). Its states then hold exactly what the hook holds, and later writes
into them (a user's, a load's) round as they would in anomalib's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from jaxnorm._src.stats import IMAGE
from torch_compat._anomalib1_design import KEYS
from torch_compat._minmax import write_stats

# The one shared metric's key in a note (1.0.x, 1.1.0, 1.1.3: fed by the first present of
# KEYS, in their order); per output (1.1.1+), each output's own.
SHARED_METRIC = ""


def _dtype(value: Any) -> torch.dtype | None:
    """The dtype of what anomalib folds of ``value`` (``torch.cat`` of box score lists)."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        out = value[0].dtype
        for v in value[1:]:
            out = torch.promote_types(out, v.dtype)
        return out
    return None  # anomalib's update fails on it; the fold names the problem


def note_fed(fed: MutableMapping[str, torch.dtype], outputs: Any, per_output: bool) -> None:
    """Adds the dtypes that ``outputs`` (a validation batch) feed each metric to ``fed``:
    ``{output: dtype}`` per output, ``{SHARED_METRIC: dtype}`` for the shared one."""
    if not isinstance(outputs, Mapping):
        return
    present = [key for key in KEYS if key in outputs]
    for key in present if per_output else present[:1]:
        dtype = _dtype(outputs[key])
        if dtype is not None:
            name = key if per_output else SHARED_METRIC
            fed[name] = torch.promote_types(fed.get(name, dtype), dtype)


def store(metric: Any, pair: tuple[float, float], fed: torch.dtype | None) -> None:
    """Writes ``(min, max)`` (the epoch's statistics) into anomalib's ``metric``, with the
    dtype anomalib's updates would leave (``_minmax.stored_dtype``; ``fed``: the dtype this
    epoch's batches fed it, ``note_fed``, ``None`` if none did)."""
    write_stats(metric, "shared", {IMAGE: pair}, fed={IMAGE: fed})
