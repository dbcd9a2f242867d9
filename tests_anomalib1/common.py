"""The synthetic ``Folder`` dataset and the training runs that tests_anomalib1 compares."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from tests import synthetic_images

IMAGE_SIZE = 64
N_GOOD, N_BAD = 16, 6
SEED = 0
# anomalib 1.x's Folder seeds its split only `if seed` (SPEC §9): 0 would leave it unseeded.
SPLIT_SEED = 1
KINDS = ("anomalib", "jaxnorm")  # whose normalization callback
# What test and predict outputs carry, normalized or computed from the raw scores.
OUTPUT_KEYS = (
    "pred_scores",
    "anomaly_maps",
    "pred_labels",
    "pred_masks",
    "pred_boxes",
    "box_scores",
    "box_labels",
)
NORMALIZATION_KEYS = ("anomaly_maps", "box_scores", "pred_scores")  # anomalib 1.1.1+'s


def anomalib_version() -> str:
    import anomalib

    return anomalib.__version__


def expected_design() -> str:
    """The design the installed anomalib has, from its release table (SPEC §9), for the
    callback's own detection (by anomalib's behaviour) to be checked against."""
    version = anomalib_version()
    if version in ("1.1.1", "1.1.2", "1.2.0"):
        return "per-output"
    if version in ("1.0.0", "1.0.1", "1.1.0", "1.1.3"):
        return "shared"
    raise AssertionError(f"anomalib {version}: not a 1.x release these tests know")


def write_folder(root: Path) -> Path:
    return synthetic_images.write_folder(root, SEED, IMAGE_SIZE, N_GOOD, N_BAD)


def datamodule(root: Path):
    from anomalib.data import Folder

    return Folder(
        name="synthetic",
        root=root,
        normal_dir="good",
        abnormal_dir="bad",
        mask_dir="mask",
        normal_split_ratio=0.25,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=SPLIT_SEED,
    )


def callback(kind: str):
    if kind == "anomalib":
        from anomalib.callbacks.normalization import _MinMaxNormalizationCallback

        return _MinMaxNormalizationCallback()
    from torch_compat.anomalib1 import MinMaxNormalizationCallback

    return MinMaxNormalizationCallback()


MODELS = {
    "padim": ("Padim", {"backbone": "resnet18", "layers": ["layer1", "layer2"]}),
    # k-center greedy is slow on 2 cores: a small coreset
    "patchcore": (
        "Patchcore",
        {"backbone": "resnet18", "layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.02},
    ),
}


def model(name: str):
    """``name``'s model without pre-trained weights (none can be downloaded here); made right
    after seeding, so both runs start from the same weights."""
    import anomalib.models
    from lightning.pytorch import seed_everything

    cls_name, kwargs = MODELS[name]
    seed_everything(SEED, workers=True)
    return getattr(anomalib.models, cls_name)(pre_trained=False, **kwargs)


def engine(root: Path, kind: str, **kwargs):
    from anomalib.engine import Engine

    return Engine(
        normalization=callback(kind),
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        deterministic=True,
        **kwargs,
    )


@dataclasses.dataclass
class Run:
    """One model trained with one normalization callback, and what a user gets from it."""

    name: str
    kind: str
    model: object
    engine: object
    checkpoint: Path
    test_metrics: dict
    predictions: list
    root: Path
    # torch_compat's warnings, by message (the box-score quirk of anomalib >= 1.1.1)
    warned: list


def train(name: str, kind: str, data: Path, out: Path) -> Run:
    from lightning.pytorch import seed_everything

    m = model(name)
    e = engine(out, kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seed_everything(SEED, workers=True)
        e.fit(m, datamodule=datamodule(data))
        ckpt = Path(e.trainer.checkpoint_callback.best_model_path)
        seed_everything(SEED, workers=True)
        (metrics,) = e.test(m, datamodule=datamodule(data))
        predictions = e.predict(m, datamodule=datamodule(data))
    warned = [str(w.message) for w in caught if w.filename and "torch_compat" in w.filename]
    return Run(name, kind, m, e, ckpt, metrics, predictions, out, warned)


def stats(metrics) -> dict[str, tuple[float, float]]:
    """``pl_module.normalization_metrics`` as ``{name: (min, max)}``: ``""`` for the one
    shared ``MinMax`` (1.0.x, 1.1.0, 1.1.3), one entry per output otherwise."""
    from torchmetrics import MetricCollection

    if isinstance(metrics, MetricCollection):
        return {k: (float(m.min), float(m.max)) for k, m in metrics.items()}
    return {"": (float(metrics.min), float(metrics.max))}


# Normalized outputs: jaxnorm multiplies by the reciprocal of the range where anomalib divides
# by it, within one ulp (docs/differences.md, "Other deliberate choices") before the + 0.5:
# within one ulp of 0.5 after it. Everything else, labels, masks and boxes included, is bit
# for bit.
NORMALIZED = ("pred_scores", "anomaly_maps", "box_scores")


def assert_same(a, b, what, ulp: bool = False):
    """Tensors equal bit for bit (dtype, shape, values), lists of them element-wise; with
    ``ulp``, float values may differ by one unit in the last place of the larger of them and
    0.5 (normalized scores: see ``NORMALIZED``)."""
    assert type(a) is type(b), (what, type(a), type(b))
    if isinstance(a, list):
        assert len(a) == len(b), (what, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, (what, i), ulp)
        return
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.isnan(), b.isnan()), what
        x, y = a[~a.isnan()], b[~b.isnan()]
        if ulp and a.is_floating_point():
            bound = torch.finfo(a.dtype).eps * torch.maximum(x.abs(), y.abs()).clamp_min(0.5)
            assert ((x - y).abs() <= bound).all(), (what, (x - y).abs().max())
        else:
            assert torch.equal(x, y), (what, a, b)
        return
    assert a == b, (what, a, b)
