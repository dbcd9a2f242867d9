"""Case ``threshold``: the F1 adaptive threshold, jaxnorm's against anomalib 2.7's and others.

One validation epoch: every batch folded in (``update``), then the threshold (``compute``),
timed as a whole, for image scores and for anomaly maps with masks (4 batches of
32x1x256x256, 8.4M values). Contenders:

- ``jaxnorm.F1AdaptiveThreshold``, exact and bounded modes;
- anomalib 2.7's ``F1AdaptiveThreshold`` where anomalib >= 2 is importable (``make
  bench-anomalib2`` runs this case in its venv); elsewhere the same math from torchmetrics'
  non-binned curve (``_binary_precision_recall_curve_compute`` and anomalib's argmax of F1):
  anomalib's ``update`` only appends;
- torchmetrics' binned curve (100 thresholds over the scores' range): constant memory, an
  approximate threshold (its update loops over the thresholds beyond 50k values, so 100,
  not 1000, keeps the case short);
- numpy: one ``argsort`` and cumulative counts, float32 F1 (exact).

Notes say whether each threshold equals anomalib's. A goal: at pixel scale, jaxnorm's exact
mode at least 3x faster than anomalib 2.7's metric.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

import jaxnorm
from benchmarks import timing
from benchmarks.cases import base
from benchmarks.records import CaseResult, timed_rows

KEY = "threshold"
TITLE = "F1 adaptive threshold per validation epoch (update per batch + compute)"

EXACT = "jaxnorm F1AdaptiveThreshold (exact)"
BOUNDED = "jaxnorm F1AdaptiveThreshold (bounded)"
ANOMALIB = "anomalib 2.7 F1AdaptiveThreshold"
TORCHMETRICS = "torchmetrics curve + anomalib's F1 (anomalib's math)"
BINNED = "torchmetrics binned curve, 100 thresholds"
NUMPY = "numpy argsort + cumsum"


def _anomalib_available() -> bool:
    if importlib.util.find_spec("anomalib") is None:
        return False
    import anomalib

    major = str(getattr(anomalib, "__version__", "0")).split(".")[0]
    return major.isdigit() and int(major) >= 2


def _data(n_batches: int, shape: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, Any]]:
    """Scores with labels: anomalous entries (blobs in maps, 10% of images) score higher."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        labels = np.zeros(shape, bool)
        if len(shape) == 1:
            labels[rng.random(shape) < 0.1] = True
        else:
            h, w = shape[-2:]
            for i in range(0, shape[0], 2):
                y, x = rng.integers(0, h - h // 6), rng.integers(0, w - w // 6)
                labels[i, ..., y : y + h // 6, x : x + w // 8] = True
        scores = base.raw_scores(shape, seed=int(rng.integers(1 << 30))) + 1.5 * labels
        out.append((scores.astype(np.float32), labels))
    return out


def _ours(batches, mode: str) -> Callable[[], Any]:
    def run():
        state = jaxnorm.F1AdaptiveThreshold.empty(mode)
        for scores, labels in batches:
            state = state.update(scores, labels)
        return state.compute()

    return run


def _anomalib(batches) -> Callable[[], Any]:
    from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold

    def run():
        metric = _F1AdaptiveThreshold()
        for scores, labels in batches:
            metric.update(scores, labels)
        return metric.compute()

    return run


def _torchmetrics(batches) -> Callable[[], Any]:
    import torch
    from torchmetrics.functional.classification.precision_recall_curve import (
        _binary_precision_recall_curve_compute,
    )

    def run():
        preds, target = [], []
        for scores, labels in batches:  # anomalib's update: flatten and keep
            preds.append(scores.flatten())
            target.append(labels.flatten())
        p, r, t = _binary_precision_recall_curve_compute(
            (torch.cat(preds), torch.cat(target)), None
        )
        f1 = torch.nan_to_num((2 * p * r) / (p + r + 1e-10), nan=0.0)
        return t[torch.argmax(f1)]

    return run


def _binned(batches) -> Callable[[], Any]:
    import torch
    from torchmetrics.classification import BinaryPrecisionRecallCurve

    lo = min(float(s.min()) for s, _ in batches)
    hi = max(float(s.max()) for s, _ in batches)
    # torchmetrics takes scores in [0, 1] (it applies a sigmoid to others): rescale by the
    # range, known in advance here, which a streaming user would not know.
    scaled = [((s - lo) / (hi - lo), lab) for s, lab in batches]

    def run():
        curve = BinaryPrecisionRecallCurve(thresholds=100, validate_args=False)
        for scores, labels in scaled:
            curve.update(scores, labels.long())
        p, r, t = curve.compute()
        f1 = torch.nan_to_num((2 * p * r) / (p + r + 1e-10), nan=0.0)
        return t[torch.argmax(f1[:-1])] * (hi - lo) + lo

    return run


def _numpy(batches) -> Callable[[], Any]:
    f32 = np.float32

    def run():
        s = np.concatenate([b.ravel() for b, _ in batches])
        y = np.concatenate([lab.ravel() for _, lab in batches])
        order = np.argsort(s, kind="stable")[::-1]
        s, y = s[order], y[order]
        last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
        tps = np.cumsum(y, dtype=np.int64)[last]
        fps = 1 + last - tps
        precision = tps.astype(f32) / (tps + fps).astype(f32)
        recall = tps.astype(f32) / f32(tps[-1])
        f1 = (f32(2) * precision * recall) / (precision + recall + f32(1e-10))
        return s[last][_last_argmax(f1)]

    return run


def _last_argmax(f1: np.ndarray) -> int:
    # The curve runs from the highest score down: anomalib's first maximum over ascending
    # thresholds is the last one here.
    f1 = np.nan_to_num(f1)
    return int(f1.size - 1 - np.argmax(f1[::-1]))


def _as_float32(x) -> np.float32:
    if hasattr(x, "cpu"):  # a torch tensor, maybe on a GPU
        x = x.float().cpu().numpy()
    return np.float32(np.asarray(x, np.float32))


def _group(res: CaseResult, cfg: base.RunConfig, label: str, batches, anomalib: bool) -> str:
    import torch

    tbatches = [(base.to_torch(s), torch.from_numpy(lab)) for s, lab in batches]
    jbatches = [(base.to_jax(s), base.to_jax(lab)) for s, lab in batches]
    n = sum(s.size for s, _ in batches)
    group = f"{label}: {len(batches)} x {batches[0][0].shape} ({n:,} values)"
    contenders = [
        timing.Contender(EXACT, _ours(jbatches, "exact"), role="jaxnorm"),
        timing.Contender(BOUNDED, _ours(jbatches, "bounded"), role="jaxnorm"),
    ]
    reference = ANOMALIB if anomalib else TORCHMETRICS
    make = _anomalib if anomalib else _torchmetrics
    torch_sync = base.torch_sync()
    contenders += [
        timing.Contender(reference, make(tbatches), sync=torch_sync, role="baseline"),
        timing.Contender(BINNED, _binned(tbatches), sync=torch_sync, role="baseline"),
        timing.Contender(NUMPY, _numpy(batches), sync=timing.no_sync, role="baseline"),
    ]
    values = {c.name: _as_float32(c.fn()) for c in contenders}
    want = values[reference]
    res.notes.append(
        f"{group}: thresholds "
        + ", ".join(
            f"{name} {float(v)!r} ({'equal' if v == want else 'differs'})"
            for name, v in values.items()
        )
        + f"; reference: {reference}."
    )
    rounds = 3 if cfg.quick else (5 if n > 1_000_000 else 15)
    config = timing.TimerConfig(rounds=rounds, block_s=0.05, warmup_s=0.0, warmup_calls=2)
    res.rows += timed_rows(group, contenders, timing.compare(contenders, config))
    return group


def run(cfg: base.RunConfig) -> CaseResult:
    """Times one validation epoch's threshold, image scores then anomaly maps."""
    res = CaseResult(key=KEY, title=TITLE)
    anomalib = _anomalib_available()
    images = (64,) if cfg.quick else (1024,)
    maps = (8, 1, 64, 64) if cfg.quick else (32, 1, 256, 256)
    _group(res, cfg, "image scores", _data(4, images, seed=1), anomalib)
    pixels = _group(res, cfg, "anomaly maps + masks", _data(4, maps, seed=2), anomalib)
    reference = ANOMALIB if anomalib else TORCHMETRICS
    res.add_ratio_target(
        f"pixel threshold, exact: time / {reference}'s", pixels, EXACT, reference, "<=", 1 / 3
    )
    if not anomalib:
        res.notes.append(
            "anomalib >= 2 is not installed here: the reference is its math from "
            "torchmetrics (anomalib's update only appends); `make bench-anomalib2` times "
            "anomalib's metric itself."
        )
    return res
