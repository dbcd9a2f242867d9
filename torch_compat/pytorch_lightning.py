"""``MinMaxNormalizationCallback`` for ``pytorch_lightning`` Trainers (anomalib 0.x's namespace)."""

from __future__ import annotations

import pytorch_lightning

from torch_compat._callback import MinMaxNormalizationHooks


class MinMaxNormalizationCallback(MinMaxNormalizationHooks, pytorch_lightning.Callback):
    __doc__ = MinMaxNormalizationHooks.__doc__


__all__ = ["MinMaxNormalizationCallback"]
