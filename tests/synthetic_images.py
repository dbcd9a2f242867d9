"""Synthetic surfaces for the anomalib integration tests (tests_anomalib, tests_anomalib2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed-metal-like RGB image in [0, 1]: smooth stripes plus noise."""
    x = np.linspace(0, 6 * np.pi, size)
    stripes = 0.5 + 0.2 * np.sin(x[None, :] + rng.uniform(0, np.pi))
    img = stripes + 0.05 * rng.standard_normal((size, size))
    return np.repeat(img[..., None], 3, axis=-1)


def save(path: Path, img: np.ndarray) -> None:
    """Writes ``img`` (values in [0, 1]) as an 8-bit PNG, making its folders."""
    from PIL import Image  # the anomalib environments have it; the main one need not

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(path)
