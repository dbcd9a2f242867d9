"""MinMaxNormalizationCallback in real Lightning Trainers, both namespaces, on CPU.

A tiny LightningModule follows anomalib's attribute protocol and records the raw outputs of
every step before the callback sees them; the tests compare what the callback leaves behind
(a recorder callback placed after it, and ``trainer.predict``'s return) with the numpy
reference of SPEC section 1 applied to those raw outputs.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import jaxnorm
from tests import compat, reference
from tests.torch_compat import module_protocol as h

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = compat.LIGHTNING_NAMESPACES
TRAINER = dict(
    accelerator="cpu",
    devices=1,
    max_epochs=2,
    limit_train_batches=2,
    num_sanity_val_steps=1,
    log_every_n_steps=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    logger=False,
    enable_checkpointing=False,
)
pytestmark = [
    # Lightning's advice for real training runs, not for these three-batch ones.
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than"),
    # Lightning 1.9's predict loop, about a dataloader of plain indices.
    pytest.mark.filterwarnings("ignore:Lightning couldn't infer the indices fetched"),
    # Lightning 2.6 on torch 2.13 builds a pytree LeafSpec, which torch deprecates.
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
]


class AnomalyModuleLogic:
    """anomalib's AnomalyModule attributes; outputs drawn per stage, round and batch.

    Each validation epoch (the sanity check included) is a new round, with a narrower range
    than the one before, so resetting and accumulating give different statistics.
    """

    def __init__(self, image_threshold=h.IMAGE_T, pixel_threshold=h.PIXEL_T, n_batches=3):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.image_threshold = h.Threshold(image_threshold)
        self.pixel_threshold = h.Threshold(pixel_threshold)
        self.image_metrics = h.Metrics()
        self.pixel_metrics = h.Metrics()
        self.n_batches = n_batches
        self.val_round = -1
        self.poison: tuple[int, int] | None = None  # (round, batch) whose maps get a NaN
        self.raw: dict[tuple[str, int], list[dict]] = {}

    def _step(self, key: tuple[str, int], seed: int, scale: float, shift: float) -> dict:
        outputs = h.make_outputs(seed, scale=scale, shift=shift)
        if self.poison == (key[1], len(self.raw.get(key, []))) and key[0] != "test":
            outputs["anomaly_maps"][0, 0, 0, 0] = math.nan
        self.raw.setdefault(key, []).append(h.clone(outputs))
        return outputs

    def on_validation_epoch_start(self):
        self.val_round += 1

    def validation_step(self, batch, batch_idx):
        stage = "sanity" if self.trainer.sanity_checking else "val"
        r = self.val_round
        return self._step((stage, r), seed=100 * r + batch_idx, scale=4 / (1 + r), shift=r)

    def test_step(self, batch, batch_idx):
        return self._step(("test", 0), seed=1000 + batch_idx, scale=4.0, shift=0.5)

    def predict_step(self, batch, batch_idx):
        return self._step(("predict", 0), seed=2000 + batch_idx, scale=4.0, shift=-0.5)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.ones(4, 1), batch_size=2)

    def _indices(self):
        return DataLoader(list(range(self.n_batches)), batch_size=None)

    val_dataloader = test_dataloader = predict_dataloader = _indices


@functools.cache
def namespace(name: str) -> types.SimpleNamespace:
    """Trainer, module, callbacks and ModelCheckpoint of one Lightning namespace."""
    if name == "pytorch_lightning":
        import pytorch_lightning as pl

        from torch_compat import MinMaxNormalizationCallback
    else:
        # anomalib 0.x's stack (Lightning 1.9) has no `lightning` distribution.
        pl = pytest.importorskip("lightning.pytorch")

        from torch_compat.lightning import MinMaxNormalizationCallback

    class Recorder(pl.Callback):
        """Placed after the normalization callback: keeps the test outputs it left."""

        def __init__(self):
            self.tested = []

        def on_test_batch_end(
            self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
        ):
            self.tested.append(h.clone(outputs))

    module = type("AnomalyModule", (AnomalyModuleLogic, pl.LightningModule), {})
    return types.SimpleNamespace(
        Trainer=pl.Trainer,
        Module=module,
        Callback=MinMaxNormalizationCallback,
        Recorder=Recorder,
        ModelCheckpoint=pl.callbacks.ModelCheckpoint,
    )


def stats_of(*batches):
    return reference.min_max(*[reference.stats_source(h.to_numpy(b)) for b in batches])


def assert_all_match(got, raw, lo, hi):
    assert len(got) == len(raw) > 0
    for g, r in zip(got, raw, strict=True):
        h.assert_matches_reference(g, r, h.IMAGE_T, h.PIXEL_T, lo, hi)
        assert torch.equal(g["label"], r["label"])


@pytest.mark.parametrize("ns_name", NAMESPACES)
def test_fit_validate_test_predict_match_reference(ns_name):
    ns = namespace(ns_name)
    model, recorder = ns.Module(), ns.Recorder()
    trainer = ns.Trainer(**TRAINER, callbacks=[ns.Callback(), recorder])

    trainer.fit(model)
    assert sorted(model.raw) == [("sanity", 0), ("val", 1), ("val", 2)]
    lo, hi = stats_of(*model.raw[("val", 2)])  # reset per epoch: the last one only
    assert model.normalization_metrics.read() == {"image": (lo, hi), "pixel": (lo, hi)}

    trainer.validate(model)
    lo, hi = stats_of(*model.raw[("val", 3)])
    assert model.normalization_metrics.read()["image"] == (lo, hi)

    trainer.test(model)
    assert model.image_metrics.thresholds == [0.5] and model.pixel_metrics.thresholds == [0.5]
    assert_all_match(recorder.tested, model.raw[("test", 0)], lo, hi)

    predicted = trainer.predict(model)
    assert_all_match(predicted, model.raw[("predict", 0)], lo, hi)


@pytest.mark.parametrize("accumulate", [False, True])
def test_accumulate_spans_the_sanity_check_and_every_epoch(accumulate):
    ns = namespace("pytorch_lightning")
    model = ns.Module()
    trainer = ns.Trainer(**TRAINER, callbacks=[ns.Callback(accumulate=accumulate)])
    trainer.fit(model)
    rounds = [("sanity", 0), ("val", 1), ("val", 2)] if accumulate else [("val", 2)]
    want = stats_of(*[b for key in rounds for b in model.raw[key]])
    assert model.normalization_metrics.read()["image"] == want
    assert want != stats_of(*model.raw[("val", 2) if accumulate else ("sanity", 0)])


def test_separate_stats_through_validate_and_predict():
    ns = namespace(compat.ANY_NAMESPACE)
    model = ns.Module()
    trainer = ns.Trainer(**TRAINER, callbacks=[ns.Callback(stats="separate")])
    trainer.validate(model)
    raw_val = [h.to_numpy(b) for b in model.raw[("val", 0)]]
    image = reference.min_max(*[b["pred_scores"] for b in raw_val])
    pixel = reference.min_max(*[b["anomaly_maps"] for b in raw_val])
    assert model.normalization_metrics.read() == {"image": image, "pixel": pixel}

    predicted = trainer.predict(model)
    for got, raw in zip(predicted, model.raw[("predict", 0)], strict=True):
        n = h.to_numpy(raw)
        np.testing.assert_allclose(
            got["pred_scores"].numpy(),
            reference.normalize(n["pred_scores"], h.IMAGE_T, *image),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            got["anomaly_maps"].numpy(),
            reference.normalize(n["anomaly_maps"], h.PIXEL_T, *pixel),
            atol=1e-6,
        )
        for g, b in zip(got["box_scores"], n["box_scores"], strict=True):
            np.testing.assert_allclose(
                g.numpy(), reference.normalize(b, h.PIXEL_T, *pixel), atol=1e-6
            )


@pytest.mark.parametrize("nonfinite", ["raise", "omit"])
def test_nonfinite_validation_outputs_through_the_trainer(nonfinite):
    ns = namespace("pytorch_lightning")
    model = ns.Module()
    model.poison = (0, 1)  # round 0 (validate's only epoch), batch 1
    trainer = ns.Trainer(**TRAINER, callbacks=[ns.Callback(nonfinite=nonfinite)])
    if nonfinite == "raise":
        with pytest.raises(jaxnorm.NonFiniteScoresError, match="1 non-finite.*'anomaly_maps'"):
            trainer.validate(model)
        return
    trainer.validate(model)
    values = np.concatenate([reference.stats_source(h.to_numpy(b)) for b in model.raw[("val", 0)]])
    assert np.isnan(values).sum() == 1
    finite = values[np.isfinite(values)]
    assert model.normalization_metrics.read()["image"] == (finite.min(), finite.max())


def test_test_without_validation_or_checkpoint_is_a_clear_error():
    ns = namespace(compat.ANY_NAMESPACE)
    trainer = ns.Trainer(**TRAINER, callbacks=[ns.Callback()])
    with pytest.raises(jaxnorm.StatisticsMissingError, match="run validation"):
        trainer.test(ns.Module())


RESTORE_SCRIPT = """
import sys, warnings
import torch
warnings.simplefilter("ignore")
from tests.torch_compat import test_lightning as t

ns = t.namespace(sys.argv[1])
# thresholds of 0: the checkpoint's must win, as must its statistics
model, recorder = ns.Module(image_threshold=0.0, pixel_threshold=0.0), ns.Recorder()
trainer = ns.Trainer(**t.TRAINER, callbacks=[ns.Callback(), recorder])
trainer.test(model, ckpt_path=sys.argv[2])
fresh = ns.Module(image_threshold=0.0, pixel_threshold=0.0)
predicted = trainer.predict(fresh, ckpt_path=sys.argv[2])
torch.save(
    {"raw": {**model.raw, **fresh.raw}, "tested": recorder.tested, "predicted": predicted,
     "metrics": model.normalization_metrics.read()},
    sys.argv[3],
)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ns_name", NAMESPACES)
def test_checkpoint_restores_stats_for_test_in_a_new_process(ns_name, tmp_path):
    ns = namespace(ns_name)
    model = ns.Module()
    checkpoint = ns.ModelCheckpoint(dirpath=tmp_path, filename="model")
    trainer = ns.Trainer(
        **{**TRAINER, "enable_checkpointing": True, "default_root_dir": tmp_path},
        callbacks=[ns.Callback(), checkpoint],
    )
    trainer.fit(model)
    lo, hi = stats_of(*model.raw[("val", 2)])
    ckpt = Path(checkpoint.best_model_path)
    assert ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert {k for k in state if k.startswith("normalization_metrics.")} == {
        "normalization_metrics.min",
        "normalization_metrics.max",
    }
    assert (
        float(state["normalization_metrics.min"]),
        float(state["normalization_metrics.max"]),
    ) == (
        lo,
        hi,
    )

    out = tmp_path / "restored.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    # Lightning < 2.4 (anomalib 0.x's) loads without weights_only, which torch >= 2.6 makes True.
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, ns_name, str(ckpt), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["metrics"] == {"image": (lo, hi), "pixel": (lo, hi)}
    assert_all_match(result["tested"], result["raw"][("test", 0)], lo, hi)
    assert_all_match(result["predicted"], result["raw"][("predict", 0)], lo, hi)
