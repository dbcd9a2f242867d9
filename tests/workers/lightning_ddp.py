"""The ``lightning.pytorch`` side of a DDP worker (tests_anomalib1, tests_anomalib2): its
inputs, and a CPU Trainer that joins the process group ``launch.ddp_commands`` set up."""

from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path
from typing import Any

import torch


def read_inputs(workdir: Path) -> tuple[int, dict]:
    """This rank's number and what ``launch.run_ddp_workers`` pickled; one thread per rank."""
    torch.set_num_threads(1)
    with open(workdir / "inputs.pkl", "rb") as f:
        return int(os.environ["RANK"]), pickle.load(f)


def trainer(spec: dict, **kwargs: Any):
    """A gloo DDP Trainer on the CPU over ``spec["world_size"]`` ranks, collectives timing out
    after ``spec["timeout"]`` seconds. No DistributedSampler: each rank validates its own
    batches."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    return Trainer(
        strategy=DDPStrategy(
            process_group_backend="gloo", timeout=datetime.timedelta(seconds=spec["timeout"])
        ),
        accelerator="cpu",
        devices=spec["world_size"],
        num_nodes=1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
