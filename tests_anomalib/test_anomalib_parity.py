"""torch_compat's callback in place of anomalib 0.7.0's, in a real anomalib installation.

Each case (a model and a task) is trained twice on a small synthetic MVTec-layout dataset
that this test writes, through anomalib's own config, datamodule, model and ``get_callbacks``:
once as anomalib builds it, once with ``torch_compat.MinMaxNormalizationCallback`` in place
of anomalib's ``MinMaxNormalizationCallback`` (the one-line swap of the README), from the
same seed. Everything a user gets must be the same: ``trainer.test`` metrics, every normalized
test and predict output, the checkpoint's keys and statistics, and the checkpoint reloads
(``trainer.test(ckpt_path=...)``, anomalib's ``LoadModelCallback`` as its ``tools/train.py``
does, and ``load_from_checkpoint``) with either callback and either run's checkpoint, and
anomalib's deploy flow (``export``'s metadata, then ``TorchInferencer``).

The cases (``CASES``) cover the three tasks and the outputs' kinds: image scores only
(dfkde, ganomaly: classification), maps without masks (dfm: classification), maps with masks
(padim, patchcore, fastflow, cflow, reverse_distillation: segmentation) and ground-truth boxes
(padim: detection); maps of shape (N, 1, H, W) and (N, H, W); scores all negative (fastflow),
with a minimum of exactly 0 (cflow) or spanning ~0.002 (ganomaly); batches of 4 and 2; box
lists empty, of one and of several boxes. Models fitted without gradients (padim, patchcore,
dfkde, dfm) and trained by gradient descent for one epoch (the rest), all at 64x64 with
``pre_trained=False``.

anomalib 0.7's other image models are left out:

- stfpm (its teacher is always pre-trained), cfa, csflow, efficient_ad and rkde download
  weights (efficient_ad also the imagenette dataset), and nothing can be downloaded here;
- draem's training is not reproducible from the seed (two runs with anomalib's own callback
  give maps, and so statistics, that differ in the 5th digit), so no two runs can be compared
  exactly; each run's statistics do equal its own maps' min and max, with either callback;
- dfm on the segmentation task and fastflow on the detection task pass too, but add nothing
  the cases above do not cover, for time;
- ai_vad is a video model.

Run it with ``make test-anomalib`` (its own venv, ci/anomalib-constraints.txt).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import anomalib
import numpy as np
import pytest
import torch
from anomalib.config import get_configurable_parameters
from anomalib.data import get_datamodule
from anomalib.models import get_model
from anomalib.utils.callbacks import LoadModelCallback, get_callbacks
from anomalib.utils.callbacks import MinMaxNormalizationCallback as AnomalibCallback
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning import Callback, Trainer, seed_everything

import torch_compat
from tests import synthetic_images

CATEGORY = "synthetic"
IMAGE_SIZE = 64
DEFECT = "scratch"
N_TRAIN, N_GOOD, N_DEFECT = 8, 3, 3


@dataclasses.dataclass(frozen=True)
class Case:
    """One anomalib model config, made small, and the task its datamodule serves.

    Attributes:
      model: the name of anomalib's model (its ``models/<name>/config.yaml``).
      task: ``dataset.task``: ``segmentation`` (masks), ``detection`` (masks and the boxes
        anomalib derives from them) or ``classification`` (labels only).
      overrides: ``model.*`` settings on top of the shipped config: small images, a small
        backbone, no weights to download (``pre_trained=False``: none can be downloaded here).
      trainer: ``trainer.*`` settings on top of the test's own (1 epoch on the CPU).
      maps: whether the model's outputs hold ``anomaly_maps`` (and so, in test and predict,
        the ``pred_masks``, ``pred_boxes`` and ``box_scores`` anomalib derives from them).
    """

    model: str
    task: str = "segmentation"
    overrides: dict = dataclasses.field(default_factory=dict)
    trainer: dict = dataclasses.field(default_factory=dict)
    maps: bool = True


PADIM = {"backbone": "resnet18", "layers": ["layer1", "layer2"]}
CASES = {
    "padim": Case("padim", overrides=PADIM),
    "patchcore": Case(
        "patchcore", overrides={"backbone": "resnet18", "layers": ["layer2", "layer3"]}
    ),
    # Image scores only: the statistics come from pred_scores (a narrow range, ~0.01 wide).
    "dfkde-classification": Case(
        "dfkde",
        "classification",
        {"backbone": "resnet18", "layers": ["layer4"], "n_pca_components": 4},
        maps=False,
    ),
    # A GAN trained from scratch; image scores only, which the model min-max normalizes
    # again itself at each validation and test epoch end (ganomaly ships with no
    # normalization callback: min_max is asked for here, as a user may). Raw scores span
    # ~0.002. Its config validates every 2 epochs: every epoch here.
    "ganomaly-classification": Case(
        "ganomaly",
        "classification",
        {"normalization_method": "min_max"},
        trainer={"check_val_every_n_epoch": 1},
        maps=False,
    ),
    # Maps but no masks: the statistics come from the maps, the pixel threshold is the
    # image threshold, and no pixel metric is computed.
    "dfm-classification": Case(
        "dfm", "classification", {"backbone": "resnet18", "layer": "layer3"}
    ),
    # Batches carry ground-truth "boxes" (lists), test and predict outputs pred_boxes and
    # box_scores (normalized by the callback with the pixel threshold).
    "padim-detection": Case("padim", "detection", PADIM),
    # Trained by gradient descent (one epoch); negative log-likelihood maps, all negative.
    "fastflow": Case("fastflow", overrides={"backbone": "resnet18"}),
    # Normalizing flow with maps shifted so that their minimum is exactly 0, shaped
    # (N, H, W) where the others' are (N, 1, H, W).
    "cflow": Case("cflow", overrides={"backbone": "resnet18", "layers": ["layer2", "layer3"]}),
    # Encoder-decoder distillation, several boxes per image; its config validates every 2
    # epochs: every epoch here.
    "reverse_distillation": Case(
        "reverse_distillation",
        overrides={"backbone": "resnet18"},
        trainer={"check_val_every_n_epoch": 1},
    ),
}
CALLBACKS = ("anomalib", "torch_compat")


# --- the dataset ------------------------------------------------------------------------


def _texture(rng: np.random.Generator) -> np.ndarray:
    return synthetic_images.texture(rng, IMAGE_SIZE)


_save = synthetic_images.save


def write_mvtec(root: Path, seed: int = 0) -> None:
    """train/good, test/good, test/<defect> and ground_truth/<defect>/*_mask.png."""
    rng = np.random.default_rng(seed)
    base = root / CATEGORY
    for i in range(N_TRAIN):
        _save(base / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(N_GOOD):
        _save(base / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(N_DEFECT):
        img = _texture(rng)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        r, c = rng.integers(8, IMAGE_SIZE - 24, size=2)
        mask[r : r + 4 + 2 * i, c : c + 16] = True
        img[mask] = rng.uniform(0.0, 0.15)
        _save(base / "test" / DEFECT / f"{i:03d}.png", img)
        mask_path = base / "ground_truth" / DEFECT / f"{i:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec(root)
    return root


# --- anomalib's flow ----------------------------------------------------------------------


def make_config(case: Case, dataset_root: Path, project: Path):
    """anomalib's own config for ``case.model``, made small, through
    get_configurable_parameters."""
    shipped = Path(anomalib.__file__).parent / "models" / case.model / "config.yaml"
    config = OmegaConf.load(shipped)
    config.dataset.update(
        path=str(dataset_root),
        category=CATEGORY,
        image_size=IMAGE_SIZE,
        center_crop=None,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        task=case.task,
    )
    config.model.update(pre_trained=False, **case.overrides)
    config.project.path = str(project)
    config.visualization.update(show_images=False, save_images=False, log_images=False)
    config.trainer.update(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **case.trainer,
    )
    path = project / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path)
    return get_configurable_parameters(model_name=case.model, config_path=path)


def callbacks_with(config, which: str) -> list[Callback]:
    """anomalib's ``get_callbacks``, with its MinMaxNormalizationCallback or ours in its place."""
    callbacks = get_callbacks(config)
    at = [i for i, c in enumerate(callbacks) if isinstance(c, AnomalibCallback)]
    assert len(at) == 1, callbacks
    if which == "torch_compat":
        callbacks[at[0]] = torch_compat.MinMaxNormalizationCallback()
    else:
        assert which == "anomalib", which
    return callbacks


def clone(x):
    """A deep copy of an output dict, tensors detached and cloned."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return copy.deepcopy(x)


class Recorder(Callback):
    """Last in the list: keeps every test and predict output as the callbacks left it."""

    def __init__(self):
        self.test, self.predict = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test.append(clone(outputs))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.predict.append(clone(outputs))


def trainer_for(config, callbacks: list[Callback]) -> Trainer:
    return Trainer(**config.trainer, logger=False, callbacks=callbacks)


class Run:
    """One training run as anomalib's tools/train.py does it, then test and predict."""

    def __init__(self, case_id: str, which: str, dataset_root: Path, workdir: Path):
        self.case_id, self.case, self.which = case_id, CASES[case_id], which
        self.config = make_config(self.case, dataset_root, workdir / f"{case_id}-{which}")
        seed_everything(self.config.project.seed)
        self.datamodule = get_datamodule(self.config)
        self.model = get_model(self.config)
        self.recorder = Recorder()
        callbacks = [*callbacks_with(self.config, which), self.recorder]
        self.trainer = trainer_for(self.config, callbacks)
        self.trainer.fit(model=self.model, datamodule=self.datamodule)
        self.ckpt_path = self.trainer.checkpoint_callback.best_model_path
        assert Path(self.ckpt_path).is_file(), (self.ckpt_path, self.trainer.callback_metrics)
        self.metrics = self.trainer.test(model=self.model, datamodule=self.datamodule)
        self.predicted = self.trainer.predict(
            model=self.model, dataloaders=self.datamodule.test_dataloader()
        )
        self.ckpt = torch.load(self.ckpt_path, map_location="cpu")


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, dataset_root, tmp_path_factory) -> dict[str, Run]:
    """Both runs of one model: anomalib's callback, then ours, each from the same seed."""
    workdir = tmp_path_factory.mktemp(request.param)
    return {which: Run(request.param, which, dataset_root, workdir) for which in CALLBACKS}


# --- comparisons ------------------------------------------------------------------------


def assert_same_outputs(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want), what
    for b, (g, w) in enumerate(zip(got, want, strict=True)):
        assert sorted(g) == sorted(w), f"{what}, batch {b}: keys differ"
        for key in w:
            _assert_same(g[key], w[key], f"{what}, batch {b}, {key!r}")


def _assert_same(got, want, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got)}"
        assert got.dtype == want.dtype and got.shape == want.shape, where
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, equal_nan=True, msg=where)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def assert_same_metrics(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want) == 1, (got, want)
    assert sorted(got[0]) == sorted(want[0]), what
    for name, value in want[0].items():
        assert got[0][name] == pytest.approx(value, abs=1e-6), f"{what}: {name}"


def test_the_dataset_is_what_anomalib_reads(runs):
    data = runs["anomalib"].datamodule
    assert len(data.train_data) == N_TRAIN
    assert len(data.test_data) == N_GOOD + N_DEFECT
    labels = torch.cat([batch["label"] for batch in runs["anomalib"].recorder.test])
    assert sorted(labels.tolist()) == [0] * N_GOOD + [1] * N_DEFECT
    # the task is what the case says: masks for segmentation, masks and boxes for detection
    task = runs["anomalib"].case.task
    for batch in runs["anomalib"].recorder.test:
        assert ("mask" in batch) == (task != "classification"), sorted(batch)
        assert ("boxes" in batch) == (task == "detection"), sorted(batch)


def test_the_swap_is_real(runs):
    assert isinstance(runs["anomalib"].model.normalization_metrics, anomalib.utils.metrics.MinMax)
    callbacks = runs["torch_compat"].trainer.callbacks
    assert sum(isinstance(c, torch_compat.MinMaxNormalizationCallback) for c in callbacks) == 1
    assert not any(isinstance(c, AnomalibCallback) for c in callbacks)


def test_statistics_and_thresholds_match(runs):
    a, ours = runs["anomalib"].model, runs["torch_compat"].model
    for name in ("min", "max"):
        got = getattr(ours.normalization_metrics, name)
        want = getattr(a.normalization_metrics, name)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, msg=name)
    for name in ("image_threshold", "pixel_threshold"):
        got, want = getattr(ours, name).value, getattr(a, name).value
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, msg=name)


def test_test_metrics_match(runs):
    assert_same_metrics(runs["torch_compat"].metrics, runs["anomalib"].metrics, "trainer.test")


def test_normalized_test_outputs_match(runs):
    got, want = runs["torch_compat"].recorder.test, runs["anomalib"].recorder.test
    assert_same_outputs(got, want, "test outputs")
    # Normalized: the scores lie in [0, 1] and are not the raw ones.
    scores = torch.cat([b["pred_scores"] for b in want])
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0


def test_normalized_predict_outputs_match(runs):
    got, want = runs["torch_compat"].predicted, runs["anomalib"].predicted
    assert_same_outputs(got, want, "trainer.predict")
    assert_same_outputs(runs["torch_compat"].recorder.predict, got, "on_predict_batch_end")
    # anomalib derives boxes from the maps in predict_step; the callback normalizes them
    maps = runs["anomalib"].case.maps
    assert all(("box_scores" in b) == maps and ("anomaly_maps" in b) == maps for b in want)


def test_checkpoint_keys_match(runs):
    got, want = runs["torch_compat"].ckpt, runs["anomalib"].ckpt
    assert sorted(got["state_dict"]) == sorted(want["state_dict"])
    for key in ("normalization_metrics.min", "normalization_metrics.max"):
        assert key in want["state_dict"], sorted(want["state_dict"])
        torch.testing.assert_close(got["state_dict"][key], want["state_dict"][key], msg=key)
    assert sorted(k for k in got if k != "callbacks") == sorted(k for k in want if k != "callbacks")


# --- reloads: every checkpoint with every callback ------------------------------------------

RELOADS = [(ckpt, cb) for ckpt in CALLBACKS for cb in CALLBACKS]
RELOAD_IDS = [f"{ckpt}-checkpoint-with-{cb}-callback" for ckpt, cb in RELOADS]


def _reload(runs, ckpt_from: str, callback: str, how: str, tmp_path: Path):
    source = runs[ckpt_from]
    config = make_config(source.case, Path(source.config.dataset.path), tmp_path)
    seed_everything(config.project.seed)
    datamodule = get_datamodule(config)
    model = get_model(config)
    recorder = Recorder()
    callbacks = [*callbacks_with(config, callback), recorder]
    if how == "LoadModelCallback":
        # anomalib's tools/train.py: the best checkpoint is loaded before testing.
        callbacks.insert(0, LoadModelCallback(weights_path=source.ckpt_path))
        metrics = trainer_for(config, callbacks).test(model=model, datamodule=datamodule)
    elif how == "load_from_checkpoint":
        model = type(model).load_from_checkpoint(source.ckpt_path)
        metrics = trainer_for(config, callbacks).test(model=model, datamodule=datamodule)
    else:
        assert how == "ckpt_path", how
        metrics = trainer_for(config, callbacks).test(
            model=model, datamodule=datamodule, ckpt_path=source.ckpt_path
        )
    return metrics, recorder.test


@pytest.mark.parametrize("how", ["ckpt_path", "LoadModelCallback", "load_from_checkpoint"])
@pytest.mark.parametrize(("ckpt_from", "callback"), RELOADS, ids=RELOAD_IDS)
def test_reload(runs, ckpt_from, callback, how, tmp_path):
    metrics, outputs = _reload(runs, ckpt_from, callback, how, tmp_path)
    want = runs["anomalib"]
    what = f"{ckpt_from} checkpoint tested with the {callback} callback through {how}"
    assert_same_metrics(metrics, want.metrics, what)
    assert_same_outputs(outputs, want.recorder.test, what)


# --- export and inference: anomalib's deploy flow ------------------------------------------


def test_exported_metadata_and_torch_inferencer_match(runs, tmp_path):
    """anomalib's ``export`` (as its ``ExportCallback`` calls it after training) reads the
    statistics from ``pl_module.normalization_metrics.state_dict()`` into the deployed
    model's metadata, and ``TorchInferencer`` normalizes with them: both must be anomalib's."""
    from anomalib.deploy import ExportMode, TorchInferencer, export

    exported, predicted = {}, {}
    image = next(Path(runs["anomalib"].config.dataset.path).rglob(f"test/{DEFECT}/*.png"))
    for which, run in runs.items():
        root = tmp_path / which
        export(
            task=run.datamodule.test_data.task,
            transform=run.datamodule.test_data.transform.to_dict(),
            input_size=(IMAGE_SIZE, IMAGE_SIZE),
            model=run.model,
            export_mode=ExportMode.TORCH,
            export_root=root,
        )
        path = root / "weights" / "torch" / "model.pt"
        exported[which] = torch.load(path, map_location="cpu", weights_only=False)["metadata"]
        predicted[which] = TorchInferencer(path=path, device="cpu").predict(image=str(image))
    got, want = exported["torch_compat"], exported["anomalib"]
    assert {"min", "max", "image_threshold", "pixel_threshold"} <= set(want)
    assert sorted(got) == sorted(want)
    for key in ("min", "max", "image_threshold", "pixel_threshold"):
        assert type(got[key]) is type(want[key]) and got[key] == want[key], key
    fields = ("pred_score", "pred_label", "anomaly_map", "pred_mask", "pred_boxes")
    for field in fields:
        g, w = getattr(predicted["torch_compat"], field), getattr(predicted["anomalib"], field)
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.shape == w.shape, field
            np.testing.assert_array_equal(g, w, err_msg=field)
        else:
            assert g == w, field
    # the inferencer normalized the score: it lies in [0, 1]
    assert 0.0 <= float(predicted["anomalib"].pred_score) <= 1.0
