"""The synthetic ``Folder`` dataset and the training runs that tests_anomalib2 compares."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path

import torch

from tests import synthetic_images

IMAGE_SIZE = 64
N_GOOD, N_BAD = 16, 6
SEED = 0
KINDS = ("anomalib", "jaxnorm")  # whose PostProcessor
# anomalib 2.7.0 PostProcessor's buffers and the fields its outputs carry.
BUFFERS = (
    "image_min",
    "image_max",
    "pixel_min",
    "pixel_max",
    "_image_threshold",
    "_pixel_threshold",
)
FIELDS = ("pred_score", "anomaly_map", "pred_label", "pred_mask")


def write_folder(root: Path, seed: int = SEED) -> Path:
    """good/, bad/ and mask/ (one mask per bad image): anomalib's ``Folder`` layout."""
    return synthetic_images.write_folder(root, seed, IMAGE_SIZE, N_GOOD, N_BAD)


def datamodule(root: Path, masks: bool = True):
    """The ``Folder`` datamodule; ``masks=False``: labels only, as a classification dataset."""
    from anomalib.data import Folder

    return Folder(
        name="synthetic",
        root=root,
        normal_dir="good",
        abnormal_dir="bad",
        mask_dir="mask" if masks else None,
        normal_split_ratio=0.25,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=SEED,
    )


def post_processor(kind: str):
    if kind == "anomalib":
        from anomalib.post_processing import PostProcessor
    else:
        from torch_compat.anomalib2 import PostProcessor
    return PostProcessor()


@dataclasses.dataclass(frozen=True)
class Spec:
    """One anomalib 2 image model, made small: its class name in ``anomalib.models`` and the
    constructor's arguments (no weights to download: ``pre_trained=False``), and whether it
    returns an ``anomaly_map`` (classification-only models return ``pred_score`` alone, so
    their pixel buffers stay NaN, anomalib 2's "not set"), and whether the dataset has masks
    (without them the pixel threshold stays NaN, and anomalib's threshold matching uses the
    image threshold for the maps)."""

    cls: str
    kwargs: dict
    maps: bool = True
    masks: bool = True


PADIM = {"backbone": "resnet18", "layers": ["layer1", "layer2"]}
SPECS = {
    "padim": Spec("Padim", PADIM),
    # maps, and a dataset without masks
    "padim-no-masks": Spec("Padim", PADIM, masks=False),
    "patchcore": Spec(
        "Patchcore",
        # k-center greedy is slow on 2 cores
        {"backbone": "resnet18", "layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.02},
    ),
    # Image scores only (a narrow range, ~0.007 wide): the pixel buffers stay NaN.
    "dfkde": Spec("Dfkde", {"backbone": "resnet18", "n_pca_components": 4}, maps=False),
    # A GAN trained from scratch, image scores only, which the model min-max normalizes
    # again itself in its own validation and test batch-end hooks (after the
    # post-processor's); raw scores span ~0.002.
    "ganomaly": Spec("Ganomaly", {"batch_size": 4}, maps=False),
    # Trained by gradient descent (one epoch); scores all negative, shaped (N, 1).
    "fastflow": Spec("Fastflow", {"backbone": "resnet18"}),
    # Encoder-decoder distillation, trained for one epoch; scores shaped (N, 1).
    "reverse_distillation": Spec("ReverseDistillation", {"backbone": "resnet18"}),
}
MODELS = tuple(SPECS)


def model(name: str, kind: str):
    """``name``'s model at 64x64 with ``kind``'s PostProcessor; made right after seeding, so
    both kinds start from the same weights."""
    import anomalib.models
    from lightning.pytorch import seed_everything

    spec = SPECS[name]
    cls = getattr(anomalib.models, spec.cls)
    kwargs = dict(spec.kwargs)
    if "pre_trained" in inspect.signature(cls.__init__).parameters:
        kwargs["pre_trained"] = False
    seed_everything(SEED, workers=True)
    return cls(
        **kwargs,
        pre_processor=pre_processor(name),
        post_processor=post_processor(kind),
        visualizer=False,
    )


def pre_processor(name: str):
    """``name``'s own pre-processor, at 64x64."""
    import anomalib.models

    cls = getattr(anomalib.models, SPECS[name].cls)
    return cls.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE))


def engine(root: Path):
    from anomalib.engine import Engine

    return Engine(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        deterministic=True,
    )


@dataclasses.dataclass
class Run:
    """One model trained with one PostProcessor, and what a user gets from it."""

    name: str
    kind: str
    model: object
    engine: object
    checkpoint: Path
    test_metrics: dict
    predictions: list
    root: Path


def train(name: str, kind: str, data: Path, out: Path) -> Run:
    from lightning.pytorch import seed_everything

    m = model(name, kind)
    e = engine(out)
    seed_everything(SEED, workers=True)
    masks = SPECS[name].masks
    e.fit(m, datamodule=datamodule(data, masks))
    ckpt = Path(e.trainer.checkpoint_callback.best_model_path)
    seed_everything(SEED, workers=True)
    (metrics,) = e.test(m, datamodule=datamodule(data, masks))
    predictions = e.predict(m, datamodule=datamodule(data, masks))
    return Run(name, kind, m, e, ckpt, metrics, predictions, out)


@functools.cache
def images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
