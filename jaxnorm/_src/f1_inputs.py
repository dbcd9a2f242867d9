"""Checks and per-batch preparation shared by ``f1_adaptive_threshold`` and its state."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import validation
from jaxnorm._src.errors import NonFiniteScoresError
from jaxnorm._src.f1_keys import SKIP, chunk_key, codes, to_key

NonFinitePolicy = Literal["raise", "omit"]
NONFINITE_POLICIES = ("raise", "omit")


class F1NonFiniteScoresError(NonFiniteScoresError):
    """Scores given to the F1 threshold held NaN or inf under ``nonfinite="raise"``."""

    def __init__(self, where: str, count: int) -> None:
        self.key = "scores"
        self.count = count
        ValueError.__init__(
            self,
            f"{where}: {count} non-finite score(s) (NaN or inf); the batches that held them "
            "were not counted. Fix the model's outputs, or pass nonfinite='omit' to skip "
            "non-finite scores (and their labels).",
        )


def check_policy(nonfinite: str) -> NonFinitePolicy:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}: expected one of {NONFINITE_POLICIES}.")
    return nonfinite  # type: ignore[return-value]


def check_inputs(where: str, scores, labels, mask):
    """``(scores, labels, mask)`` as arrays jax reads, or a ``ValueError`` that says why.

    Labels may be bool or any real dtype (anomalib compares them with 1 and 0) and must
    hold one label per score; they take the scores' shape, as anomalib flattens both.
    """
    scores = validation.as_array(f"{where}: scores", scores)
    if isinstance(labels, (jax.Array, np.ndarray)) and np.dtype(labels.dtype) == np.bool_:
        labels = np.asarray(labels) if isinstance(labels, np.ndarray) else labels
    else:
        labels = validation.as_array(f"{where}: labels", labels)
    shape = tuple(scores.shape)
    if int(np.prod(labels.shape)) != int(np.prod(shape)):
        raise ValueError(
            f"{where}: labels have shape {tuple(labels.shape)} ({int(np.prod(labels.shape))} "
            f"values) but scores have shape {shape} ({int(np.prod(shape))}); pass one label "
            "per score (a mask with the anomaly map's pixels, a label per image score)."
        )
    if tuple(labels.shape) != shape:
        labels = labels.reshape(shape)
    if mask is not None:
        mask = validation.check_mask(mask, shape)
    return scores, labels, mask


def prepare(scores, labels, mask):
    """One batch as uint32 keys and uint8 codes (``f1_keys``); pure, traced in jit."""
    key = to_key(scores)
    return key, codes(labels, key, mask)


@jax.jit
def key_range(keys: tuple, codes_: tuple):
    """The smallest and largest counted key over chunks (``2**32 - 1`` and ``0`` if none)."""
    lo, hi = jnp.uint32(0xFFFF_FFFF), jnp.uint32(0)
    for stored, code in zip(keys, codes_, strict=True):
        key, counted = chunk_key(stored), code != SKIP
        lo = jnp.minimum(lo, jnp.min(jnp.where(counted, key, jnp.uint32(0xFFFF_FFFF))))
        hi = jnp.maximum(hi, jnp.max(jnp.where(counted, key, jnp.uint32(0))))
    return lo, hi


def raise_if_nonfinite(where: str, count, nonfinite: NonFinitePolicy) -> None:
    if nonfinite == "raise" and int(count) > 0:
        raise F1NonFiniteScoresError(where, int(count))
