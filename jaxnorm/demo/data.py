"""A synthetic industrial-inspection dataset: textured surfaces with scratches and spots.

Everything is generated in numpy from one seed, so every run (and every machine) sees the
same images. Normal images are brushed, slightly uneven surfaces with sensor noise;
anomalous ones add one or two defects whose pixel masks are known exactly.

As on an inspection line, the camera frame is a little larger than the inspected region:
each sample is a frame with a ``MARGIN``-pixel border of context around the image that
is scored. The model sees the frame, so the image's edges are not guesses for it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NORMAL, SCRATCH, SPOT = 0, 1, 2
DEFECT_NAMES = {NORMAL: "normal", SCRATCH: "scratch", SPOT: "spot"}
MARGIN = 8


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of the dataset.

    Attributes:
      frames: float32 ``(N, H + 2 * MARGIN, W + 2 * MARGIN)`` in [0, 1]: the model's input.
      masks: bool ``(N, H, W)``, True on defect pixels of the inspected image.
      labels: int32 ``(N,)``, 1 for anomalous images.
      kinds: int32 ``(N,)``, the main defect: ``NORMAL``, ``SCRATCH`` or ``SPOT``.
    """

    frames: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def images(self) -> np.ndarray:
        """The inspected images, float32 ``(N, H, W)``: frames without their margin."""
        return crop(self.frames)

    def batches(self, batch_size: int):
        """Yields ``(start, frames, masks, labels)``; the last batch may be smaller."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield start, self.frames[start:end], self.masks[start:end], self.labels[start:end]


def crop(frames):
    """The inspected region of ``(..., H + 2 * MARGIN, W + 2 * MARGIN)`` frames."""
    return frames[..., MARGIN:-MARGIN, MARGIN:-MARGIN]


def _surfaces(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Brushed-metal-like textures: a few oriented gratings, uneven lighting and noise."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    yy, xx = yy[None] / size, xx[None] / size
    out = np.full((n, size, size), 0.5)
    base_angle = rng.uniform(0, np.pi, n)[:, None, None]
    for _ in range(3):
        # Orientations stay close to the image's own grain so the texture looks brushed.
        angle = base_angle + rng.normal(0, 0.15, (n, 1, 1))
        freq = rng.uniform(3, 7, (n, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        u = xx * np.cos(angle) + yy * np.sin(angle)
        out += rng.uniform(0.04, 0.08, (n, 1, 1)) * np.sin(2 * np.pi * freq * u + phase)
    gx, gy = rng.normal(0, 0.08, (2, n, 1, 1))
    out += gx * (xx - 0.5) + gy * (yy - 0.5)
    out += rng.normal(0, 0.02, out.shape)
    return out


def _scratch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight line segment, brighter or darker than the surface."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    length = rng.uniform(0.25, 0.6) * size
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    dy, dx = np.sin(angle), np.cos(angle)
    # Distance from each pixel to the segment centred at (cy, cx).
    t = np.clip((yy - cy) * dy + (xx - cx) * dx, -length / 2, length / 2)
    dist = np.hypot(yy - (cy + t * dy), xx - (cx + t * dx))
    # At least 0.7 px wide, so that some pixel centre always falls on the mask.
    width = max(rng.uniform(0.6, 1.4) * size / 64, 0.7)
    profile = np.exp(-((dist / width) ** 2))
    amplitude = rng.choice([-1, 1]) * rng.uniform(0.2, 0.45)
    return amplitude * profile, profile > 0.3


def _spot(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A soft elliptical stain or dent."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = np.maximum(rng.uniform(0.04, 0.09, 2) * size, 0.8)  # never an empty mask
    angle = rng.uniform(0, np.pi)
    u = ((yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)) / ry
    v = (-(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / rx
    profile = np.exp(-((u**2 + v**2) ** 2))
    amplitude = rng.choice([-1, 1]) * rng.uniform(0.15, 0.4)
    return amplitude * profile, profile > 0.3


def make_split(rng: np.random.Generator, n: int, size: int, anomalous_fraction: float) -> Split:
    """Generates ``n`` samples, ``round(n * anomalous_fraction)`` of them with defects."""
    frames = _surfaces(rng, n, size + 2 * MARGIN)
    images = crop(frames)  # a view: defects drawn here land in the frames
    masks = np.zeros((n, size, size), bool)
    kinds = np.zeros(n, np.int32)
    n_bad = int(round(n * anomalous_fraction))
    for i in rng.permutation(n)[:n_bad]:
        kinds[i] = rng.choice([SCRATCH, SPOT])
        n_defects = 1 + int(rng.uniform() < 0.25)
        for k in range(n_defects):
            kind = kinds[i] if k == 0 else rng.choice([SCRATCH, SPOT])
            delta, mask = (_scratch if kind == SCRATCH else _spot)(rng, size)
            images[i] += delta
            masks[i] |= mask
    frames = np.clip(frames, 0.0, 1.0).astype(np.float32)
    return Split(frames, masks, (kinds != NORMAL).astype(np.int32), kinds)


def make_dataset(
    seed: int, *, train_size: int, val_size: int, test_size: int, image_size: int
) -> tuple[Split, Split, Split]:
    """Returns ``(train, val, test)``: train is normal only, val and test are half anomalous.

    Each split draws from its own child generator, so changing one split's size leaves the
    others unchanged.
    """
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    return (
        make_split(rngs[0], train_size, image_size, 0.0),
        make_split(rngs[1], val_size, image_size, 0.5),
        make_split(rngs[2], test_size, image_size, 0.5),
    )
