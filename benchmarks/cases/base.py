"""What every case shares: the run settings, input data and device placement."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from benchmarks import environment, timing
from benchmarks import labels as L

# Anomaly maps of a 32-image test batch, and its image scores.
SCORES = (32,)
MAPS_256 = L.MAPS_256
MAPS_512 = (32, 1, 512, 512)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings shared by all cases.

    Attributes:
      quick: fewer shapes, rounds and batches; for smoke runs, not for publishing.
      timer: block length and rounds.
    """

    quick: bool
    timer: timing.TimerConfig

    @classmethod
    def make(cls, quick: bool) -> RunConfig:
        if quick:
            return cls(quick=True, timer=timing.TimerConfig(rounds=5, block_s=0.01, warmup_s=0.01))
        # Many short blocks rather than few long ones: on a shared machine the best block is
        # the one that caught a quiet moment, and short blocks catch more of them.
        return cls(quick=False, timer=timing.TimerConfig(rounds=25, block_s=0.02, warmup_s=0.05))


def np_dtype(dtype: str) -> np.dtype:
    """numpy's dtype for a name; bfloat16 comes from ml_dtypes, as in jax."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def raw_scores(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """Raw anomaly scores: a smooth positive distribution, as a model's scores are."""
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 0.5, size=shape).astype(np.float32).astype(np_dtype(dtype))


def to_jax(x: np.ndarray) -> jax.Array:
    """``x`` on jax's default device, computed, so that no transfer is timed."""
    return jax.block_until_ready(jnp.asarray(x))


def to_torch(x: np.ndarray) -> Any:
    """``x`` as a torch tensor on the torch baselines' device, with the same dtype.

    The tensor is allocated by torch, as a model's outputs are: torch aligns its buffers to 64
    bytes, numpy only to 16, and DLPack export to jax is zero-copy only for aligned buffers.
    """
    import torch

    if x.dtype == np_dtype("bfloat16"):
        t = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    else:
        t = torch.from_numpy(x).clone()
    return t.to(environment.torch_device())


def torch_sync() -> Callable[[Any], None]:
    """The sync for torch contenders on this machine."""
    return timing.sync_torch_cuda if environment.torch_device() == "cuda" else timing.no_sync
