"""Synthetic surfaces for the anomalib integration tests (tests_anomalib, tests_anomalib1,
tests_anomalib2)."""

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


def write_folder(root: Path, seed: int, size: int, n_good: int, n_bad: int) -> Path:
    """good/, bad/ and mask/ (one mask per bad image, a dark rectangle growing with its index):
    the layout of anomalib's ``Folder`` datamodule (1.x and 2.x)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n_good):
        save(root / "good" / f"{i:03d}.png", texture(rng, size))
    for i in range(n_bad):
        img = texture(rng, size)
        mask = np.zeros((size, size), bool)
        r, c = rng.integers(8, size - 24, size=2)
        mask[r : r + 4 + 2 * i, c : c + 16] = True
        img[mask] = rng.uniform(0.0, 0.15)
        save(root / "bad" / f"{i:03d}.png", img)
        (root / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "mask" / f"{i:03d}.png")
    return root
