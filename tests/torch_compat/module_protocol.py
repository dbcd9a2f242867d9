"""The ``pl_module`` anomalib 0.x's callback reads (thresholds, metric collections), batches
with anomalib's keys, and the numpy reference's check of normalized outputs: shared by the
tests of the 0.x callback, which drive its hooks by hand (trainer=None).
"""

from __future__ import annotations

import numpy as np
import torch

from tests import reference
from torch_compat.pytorch_lightning import MinMaxNormalizationCallback

IMAGE_T, PIXEL_T = 1.3, 0.7
KEYS = ("anomaly_maps", "pred_scores", "box_scores")


class Threshold(torch.nn.Module):
    """anomalib's AnomalyScoreThreshold as far as the callback reads it: a 0-d ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value))


class Metrics:
    """anomalib's metric collections as far as the callback uses them."""

    def __init__(self) -> None:
        self.thresholds: list[float] = []

    def set_threshold(self, value: float) -> None:
        self.thresholds.append(value)


class Module(torch.nn.Module):
    """The pl_module attributes anomalib's callback reads; no Lightning needed by hand."""

    def __init__(self, image_threshold=IMAGE_T, pixel_threshold=PIXEL_T, pixel_metrics=True):
        super().__init__()
        self.image_threshold = Threshold(image_threshold)
        self.pixel_threshold = Threshold(pixel_threshold)
        self.image_metrics = Metrics()
        self.pixel_metrics = Metrics() if pixel_metrics else None


def make_outputs(seed, n=3, scale=1.0, shift=0.0, boxes=True, dtype=torch.float32):
    """One batch of raw outputs with anomalib's keys; the first image has no boxes."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "anomaly_maps": (torch.randn((n, 1, 5, 5), generator=g) * scale + shift).to(dtype),
        "pred_scores": (torch.randn((n,), generator=g) * scale + shift + 1).to(dtype),
        "label": torch.arange(n),
    }
    if boxes:
        counts = [0] + [int(c) for c in torch.randint(1, 4, (n - 1,), generator=g)]
        out["box_scores"] = [
            (torch.randn((c,), generator=g) * scale + shift).to(dtype) for c in counts
        ]
    return out


def to_numpy(outputs):
    """Raw outputs as float64 numpy, for the reference (copies: the callback rewrites)."""
    out = {}
    for key, value in outputs.items():
        if key == "box_scores":
            out[key] = [b.detach().double().numpy() for b in value]
        elif key in KEYS:
            out[key] = value.detach().double().numpy()
    return out


def assert_matches_reference(got, raw, image_t, pixel_t, lo, hi, atol=1e-6):
    """``got`` (torch, normalized) equals the reference applied to ``raw`` (torch, raw)."""
    want = reference.normalize_batch(to_numpy(raw), image_t, pixel_t, lo, hi)
    for key in ("pred_scores", "anomaly_maps"):
        if key in raw:
            assert isinstance(got[key], torch.Tensor)
            assert got[key].dtype == raw[key].dtype and got[key].shape == raw[key].shape, key
            assert got[key].device == raw[key].device
            np.testing.assert_allclose(got[key].double().numpy(), want[key], atol=atol, err_msg=key)
    if "box_scores" in raw:
        assert isinstance(got["box_scores"], list)
        assert len(got["box_scores"]) == len(raw["box_scores"])
        for g, r, w in zip(got["box_scores"], raw["box_scores"], want["box_scores"], strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape
            np.testing.assert_allclose(g.double().numpy(), w, atol=atol)


def clone(outputs):
    return {
        k: [b.clone() for b in v] if isinstance(v, list) else v.clone() for k, v in outputs.items()
    }


def validate(cb, module, batches):
    cb.on_validation_epoch_start(None, module)
    for i, b in enumerate(batches):
        cb.on_validation_batch_end(None, module, b, None, i)
    cb.on_validation_epoch_end(None, module)


def fitted(batches, **options):
    """A module and callback that validated ``batches``."""
    module, cb = Module(), MinMaxNormalizationCallback(**options)
    cb.setup(None, module, "fit")
    validate(cb, module, batches)
    return module, cb
