"""One rank of tests_anomalib2/test_ddp.py: ``trainer.validate`` under Lightning DDP (gloo, CPU)
with anomalib 2.7.0's PostProcessor, then with torch_compat's.

Usage: python tests_anomalib2/workers/ddp_rank.py WORKDIR

Launched with torchrun's variables (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK,
NODE_RANK), so Lightning starts no processes of its own. Reads ``WORKDIR/inputs.pkl`` (each
rank's validation batches); writes ``WORKDIR/rank{RANK}.json``: each class's buffers, or its
error, and how often anomalib's threshold metrics were updated.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
from anomalib.data import ImageBatch
from anomalib.metrics import F1AdaptiveThreshold
from anomalib.post_processing import PostProcessor as AnomalibPostProcessor
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

import jaxnorm
from tests.workers import lightning_ddp
from torch_compat.anomalib2 import PostProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests_anomalib2/
from common import BUFFERS  # noqa: E402

warnings.filterwarnings("ignore", module="lightning|lightning_fabric|torchmetrics")

UPDATES: dict[int, int] = {}  # F1AdaptiveThreshold.update calls, by the metric's id
_update = F1AdaptiveThreshold.update


def _counted_update(self, *args, **kwargs):
    UPDATES[id(self)] = UPDATES.get(id(self), 0) + 1
    return _update(self, *args, **kwargs)


F1AdaptiveThreshold.update = _counted_update


class Scores(LightningModule):
    """Its validation outputs are the data: the test checks the post-processor's buffers."""

    def __init__(self, post_processor, batches):
        super().__init__()
        self.post_processor = post_processor
        self.batches = batches

    def configure_callbacks(self):
        return [self.post_processor]  # as anomalib's AnomalibModule does

    def val_dataloader(self):
        # No DistributedSampler: each rank validates its own batches.
        return DataLoader(range(len(self.batches)), batch_size=None)

    def validation_step(self, index, batch_idx):
        b = self.batches[int(index)]
        return ImageBatch(
            image=torch.zeros(len(b["pred_score"]), 3, 4, 4),
            gt_label=torch.from_numpy(b["gt_label"]),
            gt_mask=torch.from_numpy(b["gt_mask"]),
            pred_score=torch.from_numpy(b["pred_score"]),
            anomaly_map=torch.from_numpy(b["anomaly_map"]),
        )


def main(workdir: Path) -> None:
    rank, spec = lightning_ddp.read_inputs(workdir)
    trainer = lightning_ddp.trainer(spec)
    result = {"rank": rank}
    for kind, cls in (("anomalib", AnomalibPostProcessor), ("jaxnorm", PostProcessor)):
        pp = cls()
        try:
            trainer.validate(Scores(pp, spec["val"][rank]))
        except jaxnorm.NonFiniteScoresError as e:
            result[f"{kind}_error"] = {"key": e.key, "count": e.count, "msg": str(e)}
        result[kind] = {name: getattr(pp, name).item() for name in BUFFERS}
        # how often anomalib's own threshold metrics were updated (ours: never)
        metrics = (pp._image_threshold_metric, pp._pixel_threshold_metric)
        result[f"{kind}_metric_updates"] = sum(UPDATES.get(id(m), 0) for m in metrics)
    result["world_size"] = trainer.world_size
    with open(workdir / f"rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
