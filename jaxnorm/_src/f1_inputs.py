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
            f"{where}: {count} non-finite score(s) (NaN or inf), so no threshold is given. "
            "Fix the model's outputs, or pass nonfinite='omit' to leave non-finite scores "
            "(and their labels) out.",
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
    labels = as_labels(f"{where}: labels", labels)
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
    scores, labels, mask = auto_axes_view(where, scores, labels, mask)
    return scores, labels, mask


def as_labels(name: str, labels):
    """``labels`` as an array jax reads: bool arrays as they are, anything else through
    ``validation.as_array`` (a real number type; ``name`` names it in the error)."""
    if isinstance(labels, (jax.Array, np.ndarray)) and np.dtype(labels.dtype) == np.bool_:
        return np.asarray(labels) if isinstance(labels, np.ndarray) else labels
    return validation.as_array(name, labels)


_AXIS_TYPE = getattr(jax.sharding, "AxisType", None)


def _explicit(x) -> bool:
    sharding = getattr(x, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", None) or ()
    return _AXIS_TYPE is not None and any(t == _AXIS_TYPE.Explicit for t in types)


def auto_axes_view(where: str, *arrays):
    """``arrays`` with explicitly sharded mesh axes seen as automatic ones (zero-copy).

    The F1 state counts with scatter-adds, and jax types an index array sharded over an
    explicit mesh axis with that axis, which its scatter rejects. The same buffers under a
    mesh of automatic axes are the same data to XLA. Inside the caller's jit (a tracer) the
    type cannot be changed here: that raises with what to do.
    """
    out = []
    for x in arrays:
        if isinstance(x, jax.Array) and _explicit(x) and not validation.is_tracer(x):
            mesh = x.sharding.mesh
            auto = jax.sharding.Mesh(
                mesh.devices, mesh.axis_names, axis_types=(_AXIS_TYPE.Auto,) * len(mesh.axis_names)
            )
            x = jax.device_put(x, jax.sharding.NamedSharding(auto, x.sharding.spec))
        elif validation.is_tracer(x) and _explicit(getattr(x, "aval", None)):
            raise ValueError(
                f"{where}: the values are sharded over an explicit mesh axis inside jit, where "
                "the F1 state's scatter-adds cannot be typed; call update outside the jitted "
                "step (it is one jitted call itself), or use a mesh of AxisType.Auto axes."
            )
        out.append(x)
    return out


def prepare(scores, labels, mask):
    """One batch as uint32 keys and uint8 codes (``f1_keys``); pure, traced in jit."""
    key = to_key(scores)
    return key, codes(labels, key, mask)


def key_range(chunks) -> tuple[int, int]:
    """The smallest and largest counted key over ``(scores or keys, codes)`` chunks
    (``2**32 - 1`` and ``0`` if none is counted); one dispatch per chunk."""
    lo, hi = 0xFFFF_FFFF, 0
    for stored, code in chunks:
        c_lo, c_hi = (int(x) for x in jax.device_get(chunk_range(stored, code)))
        lo, hi = min(lo, c_lo), max(hi, c_hi)
    return lo, hi


@jax.jit
def chunk_range(stored, code):
    key, counted = chunk_key(stored), code != SKIP
    lo = jnp.min(jnp.where(counted, key, jnp.uint32(0xFFFF_FFFF)))
    hi = jnp.max(jnp.where(counted, key, jnp.uint32(0)))
    return lo, hi


def raise_if_nonfinite(where: str, count, nonfinite: NonFinitePolicy) -> None:
    if nonfinite == "raise" and int(count) > 0:
        raise F1NonFiniteScoresError(where, int(count))
