"""One rank of tests/torch_compat/test_ddp.py: a Lightning DDP run (gloo, CPU) with the
normalization callback.

Usage: python tests/workers/ddp_rank.py WORKDIR

The test launches one process per rank with torchrun's variables (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK), so Lightning starts no processes of its own. Reads
``WORKDIR/inputs.pkl``; writes ``WORKDIR/rank{RANK}.json`` and ``WORKDIR/rank{RANK}.npz``.
"""

import datetime
import inspect
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

import jaxnorm
import torch_compat._allreduce
from torch_compat import MinMaxNormalizationCallback

warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric")


class Threshold:
    """anomalib's threshold objects: the raw-score threshold in ``.value``, a 0-d tensor."""

    def __init__(self, value: float) -> None:
        self.value = torch.tensor(value)


class Metrics:
    """anomalib's metric collections as far as the callback uses them."""

    def __init__(self) -> None:
        self.threshold = None

    def set_threshold(self, value: float) -> None:
        self.threshold = value


class Batches(Dataset):
    """Each item is a whole batch (DataLoader(batch_size=None)): a dict of tensors."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        b = self.batches[i]
        return {
            "anomaly_maps": torch.from_numpy(b["anomaly_maps"]),
            "pred_scores": torch.from_numpy(b["pred_scores"]),
            "box_scores": [torch.from_numpy(x) for x in b["box_scores"]],
        }


class TinyModel(pl.LightningModule):
    """Scores are the data: the test checks the statistics, not a model."""

    def __init__(self, val_by_rank, image_threshold, pixel_threshold):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.val_by_rank = val_by_rank
        self.image_threshold = Threshold(image_threshold)
        self.pixel_threshold = Threshold(pixel_threshold)
        self.image_metrics = Metrics()
        self.pixel_metrics = None

    def training_step(self, batch, batch_idx):
        return (self.layer(batch) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.ones(4, 1), batch_size=2)

    def val_dataloader(self):
        # No DistributedSampler: each rank validates its own data.
        return DataLoader(Batches(self.val_by_rank[self.global_rank]), batch_size=None)

    def _outputs(self, batch):
        return {
            "anomaly_maps": batch["anomaly_maps"].clone(),
            "pred_scores": batch["pred_scores"].clone(),
            "box_scores": [b.clone() for b in batch["box_scores"]],
        }

    def validation_step(self, batch, batch_idx):
        return self._outputs(batch)

    def test_step(self, batch, batch_idx):
        return self._outputs(batch)

    def predict_step(self, batch, batch_idx):
        return self._outputs(batch)


class Recorder(pl.Callback):
    """Runs after the normalization callback: keeps what it left behind."""

    def __init__(self, norm):
        self.norm = norm
        self.epochs = []
        self.tested = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.epochs.append(
            {
                "sanity": trainer.sanity_checking,
                "metrics": pl_module.normalization_metrics.read(),
                "hook": self.norm.hook.host_stats(),
            }
        )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.tested.append(outputs)


class ResetLikeLightning1(pl.Callback):
    """Placed before the normalization callback: what Lightning 1.x does after a restore.

    Lightning 1.9 resets every torchmetrics Metric on ranks other than 0 after loading a
    checkpoint (their states are taken to be on rank 0); Lightning 2 does not. Doing it here
    on every Lightning makes the DDP tests cover it.
    """

    def on_predict_start(self, trainer, pl_module):
        if trainer.global_rank != 0:
            pl_module.normalization_metrics.reset()


def flatten(prefix, outputs, into):
    for b, out in enumerate(outputs):
        for key in ("pred_scores", "anomaly_maps"):
            into[f"{prefix}/{b}/{key}"] = out[key].numpy()
        for j, box in enumerate(out["box_scores"]):
            into[f"{prefix}/{b}/box_scores/{j}"] = box.numpy()


# Lightning 2 renamed Trainer(replace_sampler_ddp=) to use_distributed_sampler=.
_SAMPLER_ARG = (
    "use_distributed_sampler"
    if "use_distributed_sampler" in inspect.signature(pl.Trainer.__init__).parameters
    else "replace_sampler_ddp"
)


def main(workdir: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    with open(workdir / "inputs.pkl", "rb") as f:
        spec = pickle.load(f)
    cfg = spec["config"]
    norm = MinMaxNormalizationCallback(nonfinite=cfg["nonfinite"])
    if cfg["no_reduce"]:
        # Negative control only: whatever reducer the callback sets, the hook never uses it.
        torch_compat._allreduce.epoch_reducer = lambda: None
    recorder = Recorder(norm)
    checkpoint = ModelCheckpoint(dirpath=workdir / "ckpt", filename="model")
    trainer = pl.Trainer(
        strategy=DDPStrategy(
            process_group_backend="gloo", timeout=datetime.timedelta(seconds=cfg["timeout"])
        ),
        accelerator="cpu",
        devices=spec["world_size"],
        num_nodes=1,
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=1,
        **{_SAMPLER_ARG: False},
        callbacks=[ResetLikeLightning1(), norm, recorder, checkpoint],
        default_root_dir=workdir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TinyModel(spec["val"], cfg["image_threshold"], cfg["pixel_threshold"])
    result = {"rank": rank, "errors": []}
    try:
        trainer.fit(model)
    except jaxnorm.NonFiniteScoresError as e:
        result["errors"].append({"key": e.key, "count": e.count, "msg": str(e)})
    result["world_size"] = trainer.world_size
    result["global_rank"] = trainer.global_rank
    result["epochs"] = recorder.epochs

    arrays = {}
    if not result["errors"]:
        ckpt = checkpoint.best_model_path
        result["checkpoint"] = ckpt
        test_loader = DataLoader(Batches(spec["test"]), batch_size=None)
        trainer.test(model, dataloaders=test_loader)
        flatten("test", recorder.tested, arrays)
        result["image_metrics_threshold"] = model.image_metrics.threshold
        # predict from the checkpoint: the statistics come back from it
        fresh = TinyModel(spec["val"], cfg["image_threshold"], cfg["pixel_threshold"])
        predicted = trainer.predict(fresh, dataloaders=test_loader, ckpt_path=ckpt)
        flatten("predict", predicted, arrays)
        result["restored"] = fresh.normalization_metrics.read()
    np.savez(workdir / f"rank{rank}.npz", **arrays)
    with open(workdir / f"rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
