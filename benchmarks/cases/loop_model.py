"""The ``loop`` case's model and Lightning wiring: a conv feature model with anomalib's outputs.

A ResNet-18 stem (conv1 to layer2, in plain torch) turns each batch of images into
anomalib-style outputs, and the module carries anomalib's threshold objects; ``namespace``
gives the Lightning module, the three callbacks (none, anomalib 0.7's, the shim) and a last
callback that records each batch's end, in the Lightning namespace torch_compat uses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling
from torch import nn

from benchmarks import anomalib_ref
from benchmarks import labels as L

# Lightning's advice for real training runs, not for a benchmark's loops, and a deprecation
# inside Lightning itself (2.6 on torch 2.13); anything else still shows.
_QUIET = [
    (r"The '\w+_dataloader' does not have many workers", Warning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
]
_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with batch norm, and a projected shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


def stem(width: int) -> nn.Sequential:
    """ResNet-18 from conv1 to layer2 (stride 8), ``width`` channels after conv1 (64 there)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        BasicBlock(width, width, 1),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 2 * width, 1),
    )


class Threshold(nn.Module):
    """anomalib's threshold metric as the callbacks see it: a ``value`` tensor on the module."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value)))


class ModelLogic:
    """The LightningModule's body (mixed into the namespace's ``LightningModule``)."""

    def __init__(self, width: int, images: dict[str, list[torch.Tensor]]) -> None:
        super().__init__()
        self.features = stem(width)
        self.image_threshold = Threshold(0.0)
        self.pixel_threshold = Threshold(0.0)
        self.image_metrics = None
        self.pixel_metrics = None
        self.images = images  # per stage: the pool of input batches, cycled
        self.batches = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        maps = F.interpolate(
            f.square().mean(1, keepdim=True),
            size=x.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        return {"anomaly_maps": maps, "pred_scores": maps.amax(dim=(1, 2, 3))}

    def _step(self, stage: str, batch_idx: int) -> dict[str, torch.Tensor]:
        pool = self.images[stage]
        return self(pool[batch_idx % len(pool)])

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        del batch
        return self._step("validate", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        del batch
        return self._step("test", batch_idx)


def loader(n: int) -> Any:
    # Indices only: the images stay on the model's device (a pool in ``ModelLogic.images``), so
    # no host-to-device copy of 25 MiB per batch blurs what the callbacks cost.
    return torch.utils.data.DataLoader(list(range(n)), batch_size=None)


def namespace() -> types.SimpleNamespace:
    """The Lightning namespace torch_compat's default callback uses, and its pieces."""
    if importlib.util.find_spec("pytorch_lightning") is not None:  # anomalib 0.x's
        import pytorch_lightning as pl

        from torch_compat.pytorch_lightning import MinMaxNormalizationCallback
    else:
        import lightning.pytorch as pl

        from torch_compat.lightning import MinMaxNormalizationCallback

    class AnomalibCallback(anomalib_ref.MinMaxNormalizationCallback, pl.Callback):
        """anomalib 0.7's callback, a Lightning callback."""

    class Last(pl.Callback):
        """Placed last: keeps the last batch's outputs as the callbacks left them, and the
        time each batch ended."""

        def __init__(self) -> None:
            self.outputs: Any = None
            self.stamps: list[float] = []

        def on_validation_batch_end(self, trainer, pl_module, outputs, *args: Any) -> None:
            self.outputs = outputs
            self.stamps.append(time.perf_counter())

        def on_test_batch_end(self, trainer, pl_module, outputs, *args: Any) -> None:
            self.outputs = outputs
            self.stamps.append(time.perf_counter())

    return types.SimpleNamespace(
        pl=pl,
        Module=type("LoopModel", (ModelLogic, pl.LightningModule), {}),
        callbacks={
            L.NO_CALLBACK: lambda: None,
            L.ANOMALIB_CALLBACK: AnomalibCallback,
            L.SHIM: MinMaxNormalizationCallback,
        },
        Last=Last,
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's info lines (devices, ...) and its advice warnings off; other warnings stay."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    with warnings.catch_warnings():
        for message, category in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category)
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
