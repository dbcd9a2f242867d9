"""jaxnorm's F1 threshold against anomalib 2.7's ``F1AdaptiveThreshold``, side by side.

One validation epoch at pixel scale: 4 batches of 32 x 1 x 256 x 256 float32 maps with
blob masks (8.4M values), ``update`` per batch then ``compute``, for anomalib's metric and
for ``jaxnorm.F1AdaptiveThreshold`` in both modes; the first round compiles, the second is
warm. Prints seconds and thresholds (they must be equal). Needs anomalib 2 (``make
setup-anomalib2``):

  PYTHONPATH=$PWD .venv-anomalib2/bin/python benchmarks/probes/f1_threshold_probe.py
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import torch
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold

import jaxnorm


def main() -> None:
    rng = np.random.default_rng(0)
    maps, masks = [], []
    for _ in range(4):
        m = np.zeros((32, 1, 256, 256), bool)
        for i in range(0, 32, 2):
            y, x = rng.integers(20, 200, 2)
            m[i, 0, y : y + 40, x : x + 30] = True
        maps.append((rng.standard_normal(m.shape) + 2.5 * m).astype(np.float32))
        masks.append(m)
    tm, tk = [torch.from_numpy(s) for s in maps], [torch.from_numpy(m) for m in masks]
    jm, jk = [jnp.asarray(s) for s in maps], [jnp.asarray(m) for m in masks]

    def anomalib():
        metric = _F1AdaptiveThreshold()
        for s, m in zip(tm, tk, strict=True):
            metric.update(s, m)
        return float(metric.compute())

    def ours(mode):
        def run():
            state = jaxnorm.F1AdaptiveThreshold.empty(mode)
            for s, m in zip(jm, jk, strict=True):
                state = state.update(s, m)
            return float(state.compute())

        return run

    for label in ("first (compiles)", "warm"):
        for name, fn in (
            ("anomalib 2.7", anomalib),
            ("exact", ours("exact")),
            ("bounded", ours("bounded")),
        ):
            t = time.perf_counter()
            value = fn()
            print(f"{label:17} {name:13} {time.perf_counter() - t:8.3f} s  threshold {value!r}")


if __name__ == "__main__":
    main()
