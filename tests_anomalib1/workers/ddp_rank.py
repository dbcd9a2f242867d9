"""One rank of tests_anomalib1/test_ddp.py: ``trainer.validate`` under Lightning DDP (gloo, CPU)
with anomalib 1.x's normalization callback, then with torch_compat's.

Usage: python tests_anomalib1/workers/ddp_rank.py WORKDIR

Launched with torchrun's variables (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK,
NODE_RANK), so Lightning starts no processes of its own. Reads ``WORKDIR/inputs.pkl`` (each
rank's validation batches); writes ``WORKDIR/rank{RANK}.json``: each callback's statistics
(``{name: [min, max]}``, name ``""`` for anomalib's one shared ``MinMax``), or its error.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
from anomalib.callbacks.normalization import _MinMaxNormalizationCallback
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

import jaxnorm
from tests.workers import lightning_ddp
from torch_compat.anomalib1 import MinMaxNormalizationCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests_anomalib1/
from common import stats  # noqa: E402

warnings.filterwarnings("ignore", module="lightning|lightning_fabric|torchmetrics")


class Scores(LightningModule):
    """Its validation outputs are the data: the test checks the statistics."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def val_dataloader(self):
        # No DistributedSampler: each rank validates its own batches.
        return DataLoader(range(len(self.batches)), batch_size=None)

    def validation_step(self, index, batch_idx):
        b = self.batches[int(index)]
        return {key: torch.from_numpy(b[key]) for key in ("pred_scores", "anomaly_maps")}


def main(workdir: Path) -> None:
    rank, spec = lightning_ddp.read_inputs(workdir)
    result = {"rank": rank}
    for kind, cls in (
        ("anomalib", _MinMaxNormalizationCallback),
        ("jaxnorm", MinMaxNormalizationCallback),
    ):
        trainer = lightning_ddp.trainer(spec, callbacks=[cls()])
        module = Scores(spec["val"][rank])
        try:
            trainer.validate(module)
        except jaxnorm.NonFiniteScoresError as e:
            result[f"{kind}_error"] = {"key": e.key, "count": e.count, "msg": str(e)}
        result[kind] = stats(module.normalization_metrics)
        result["world_size"] = trainer.world_size
    with open(workdir / f"rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
