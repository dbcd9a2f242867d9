"""``MinMaxNormalizationCallback`` for ``lightning.pytorch`` Trainers (``import lightning``)."""

from __future__ import annotations

import lightning.pytorch

from torch_compat._callback import MinMaxNormalizationHooks


class MinMaxNormalizationCallback(MinMaxNormalizationHooks, lightning.pytorch.Callback):
    __doc__ = MinMaxNormalizationHooks.__doc__


__all__ = ["MinMaxNormalizationCallback"]
