"""A Lightning ``Trainer`` with ``torch_compat.MinMaxNormalizationCallback``, anomalib 0.x style.

The module follows anomalib 0.x's ``AnomalyModule`` protocol, which is all the callback
reads: ``validation_step``/``predict_step`` return dicts with ``anomaly_maps`` and
``pred_scores``, and ``image_threshold.value``/``pixel_threshold.value`` hold the raw-score
thresholds (anomalib sets them from the validation scores, as ``on_validation_epoch_end``
does here). Validation feeds the statistics, which land in ``normalization_metrics`` (and
in checkpoints, under anomalib's keys); ``trainer.predict`` returns normalized outputs.

The model: a linear autoencoder over 16-value "images"; an anomalous one has a spike it
cannot redraw. Runs on pytorch-lightning 1.9 (anomalib 0.7's) and 2.x.

Run it: ``python examples/lightning_shim.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import logging
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from torch_compat import MinMaxNormalizationCallback

torch.manual_seed(0)
# This script prints only what it is about. Lightning's banners (the devices found, its tips,
# "fit stopped") are INFO logs; its advice on loader workers and the deprecation that
# Lightning 2.6 triggers in torch's pytree (LeafSpec) concern Lightning, not this script.
for _name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", r".*does not have many workers", UserWarning)
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)`", FutureWarning)


def make_images(n: int, anomalous: float) -> TensorDataset:
    """``n`` flattened 4x4 images (smooth gradients) and labels; anomalous ones have a spike."""
    ramp = torch.linspace(0.0, 1.0, 4)
    tilt = torch.rand(n, 2, 1, 1) * 2 - 1
    images = (tilt[:, 0] * ramp[:, None] + tilt[:, 1] * ramp[None, :]).reshape(n, 16)
    images += 0.02 * torch.randn(n, 16)
    labels = torch.rand(n) < anomalous
    images[labels, torch.randint(0, 16, (int(labels.sum()),))] += 2.0
    return TensorDataset(images, labels)


class Threshold(torch.nn.Module):
    """anomalib's threshold metric, reduced to what the callback reads: ``value``."""

    def __init__(self, value: float = 0.5):
        super().__init__()
        self.register_buffer("value", torch.tensor(value))


class AnomalyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 3), torch.nn.Linear(3, 16))
        self.image_threshold = Threshold()
        self.pixel_threshold = Threshold()
        self.val_scores: list[torch.Tensor] = []
        self.val_labels: list[torch.Tensor] = []

    def forward(self, images):
        error = (self.model(images) - images) ** 2
        return {"anomaly_maps": error.reshape(-1, 1, 4, 4), "pred_scores": error.amax(dim=1)}

    def training_step(self, batch, batch_idx):
        images, _ = batch
        return torch.mean((self.model(images) - images) ** 2)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        outputs = self(images)  # the callback folds these into the statistics
        self.val_scores.append(outputs["pred_scores"])
        self.val_labels.append(labels)
        return outputs

    def on_validation_epoch_end(self):
        # As anomalib's adaptive threshold: the raw score with the best F1 on validation.
        scores, labels = torch.cat(self.val_scores), torch.cat(self.val_labels)
        self.val_scores.clear()
        self.val_labels.clear()

        def f1(t):
            predicted = scores >= t
            return 2 * (predicted & labels).sum() / (predicted.sum() + labels.sum())

        best = max(scores.unique(), key=f1)
        self.image_threshold.value.fill_(best)
        self.pixel_threshold.value.fill_(best)  # the maps' maximum is the image score

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        images, labels = batch
        outputs = self(images)  # the callback normalizes these; the copies stay raw
        return {**outputs, "label": labels, "raw_scores": outputs["pred_scores"].clone()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loader(n: int, anomalous: float, shuffle: bool = False) -> DataLoader:
    return DataLoader(make_images(n, anomalous), batch_size=32, shuffle=shuffle)


# A quiet run: no progress bar, logger, checkpoint files or model summary.
QUIET = dict(
    enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False
)

model = AnomalyModule()
trainer = pl.Trainer(
    accelerator="cpu",
    max_epochs=3,
    callbacks=[MinMaxNormalizationCallback()],
    **QUIET,
)
trainer.fit(model, loader(2048, 0.0, shuffle=True), loader(128, 0.5))
predictions = trainer.predict(model, loader(128, 0.5))  # normalized by the callback

stats = model.normalization_metrics  # anomalib's keys: normalization_metrics.min / .max
print(f"statistics: min {float(stats.min):.4f}, max {float(stats.max):.4f}")
print(f"image threshold (raw): {float(model.image_threshold.value):.4f}")
agree = hits = total = 0
for batch in predictions:
    scores, raw, labels = batch["pred_scores"], batch["raw_scores"], batch["label"]
    for key in ("anomaly_maps", "pred_scores"):
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0, key
    agree += int(((scores >= 0.5) == (raw >= model.image_threshold.value)).sum())
    hits += int(((scores >= 0.5) == labels).sum())
    total += len(scores)

assert agree == total, (agree, total)
print("every predicted score in [0, 1], threshold at 0.5")
print(f"decisions at 0.5 that match the raw threshold: {agree}/{total}")
print(f"test images classified correctly at 0.5: {hits}/{total}")
