"""Loops of many batches through each callback, for the pipelined cases (not a case itself).

A real test or validation loop never waits for a batch's results before it hands the next
batch over: metrics consume the outputs on the device. The loops here do the same: each
runs ``n`` batches through one contender and returns the last outputs, which the contender's
sync then waits for, once. On one device, executions run in the order they were dispatched
(one stream on a GPU; on CPU checked by ``in_order_note``), so the last result being ready
means every batch is done.

Every contender goes through public API only: ``jaxnorm.MinMaxNormalizationHook``'s hooks,
``torch_compat.MinMaxNormalizationCallback``'s hooks driven by hand with ``trainer=None``
and a stand-in ``pl_module``, and anomalib 0.7's callback code (``benchmarks.anomalib_ref``).
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxnorm
from benchmarks import anomalib_ref, environment
from benchmarks import labels as L
from benchmarks.cases import base

IMAGE_THRESHOLD, PIXEL_THRESHOLD = 1.2, 0.9
# Distinct batches cycled through a loop: enough that no contender sees one array twice in a
# row, few enough that a pool of (32, 1, 256, 256) maps stays small.
POOL = 4

HOOK, SHIM, ANOMALIB = L.HOOK, L.SHIM, L.ANOMALIB_CALLBACK

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Pool:
    """The same batches as numpy, jax and torch arrays (anomalib's keys)."""

    numpy: list[Batch]
    jax: list[Batch]
    torch: list[Batch]


def make_pool(
    maps: tuple[int, ...] | None, seed: int, size: int = POOL, nan_every: int = 0
) -> Pool:
    """``size`` batches of 32 scores, plus maps of shape ``maps`` when given.

    With ``nan_every = k > 0``, batches ``0, k, 2k, ...`` of the pool carry one NaN in their
    maps (or scores): what ``nonfinite="omit"`` skips.
    """
    batches = []
    for i in range(size):
        b = {"pred_scores": base.raw_scores(base.SCORES, seed=seed + i)}
        if maps is not None:
            b["anomaly_maps"] = base.raw_scores(maps, seed=seed + 1000 + i)
        if nan_every and i % nan_every == 0:
            key = "anomaly_maps" if maps is not None else "pred_scores"
            b[key] = b[key].copy()
            b[key].reshape(-1)[3] = np.nan
        batches.append(b)
    return Pool(
        numpy=batches,
        jax=[{k: base.to_jax(v) for k, v in b.items()} for b in batches],
        torch=[{k: base.to_torch(v) for k, v in b.items()} for b in batches],
    )


def pl_module() -> types.SimpleNamespace:
    """The attributes of an anomalib module that the callbacks read."""
    dev = environment.torch_device()
    return types.SimpleNamespace(
        image_threshold=types.SimpleNamespace(value=torch.tensor(IMAGE_THRESHOLD, device=dev)),
        pixel_threshold=types.SimpleNamespace(value=torch.tensor(PIXEL_THRESHOLD, device=dev)),
        image_metrics=None,
        pixel_metrics=None,
    )


def shim_class() -> type:
    """``torch_compat.MinMaxNormalizationCallback`` (raises ImportError without Lightning)."""
    from torch_compat import MinMaxNormalizationCallback

    return MinMaxNormalizationCallback


# -- validation: statistics accumulation --------------------------------------------------


def hook_validation(hook: Any, pool: list[Batch], n: int) -> Callable[[], Any]:
    """One validation epoch of ``n`` batches through the Flax hook; returns its statistics."""

    def run():
        hook.on_validation_epoch_start()
        for i in range(n):
            hook.on_validation_batch_end(pool[i % len(pool)])
        hook.on_validation_epoch_end()
        return hook.stats

    return run


def shim_validation(cb: Any, pm: Any, pool: list[Batch], n: int) -> Callable[[], Any]:
    """One validation epoch of ``n`` batches through the Lightning shim."""

    def run():
        cb.on_validation_epoch_start(None, pm)
        for i in range(n):
            cb.on_validation_batch_end(None, pm, dict(pool[i % len(pool)]), None, i, 0)
        cb.on_validation_epoch_end(None, pm)
        return pm.normalization_metrics

    return run


def anomalib_validation(cb: Any, pm: Any, pool: list[Batch], n: int) -> Callable[[], Any]:
    """One validation epoch through anomalib 0.7's callback, with a fresh ``MinMax`` metric.

    anomalib resets its metric's state with the module's other metrics at each epoch; a
    fresh metric stands in for that.
    """
    dev = environment.torch_device()

    def run():
        pm.normalization_metrics = anomalib_ref.MinMax().to(dev)
        for i in range(n):
            cb.on_validation_batch_end(None, pm, dict(pool[i % len(pool)]), None, i, 0)
        return pm.normalization_metrics.compute()

    return run


def validation_stats(name: str, obj: Any) -> tuple[float, float]:
    """``(min, max)`` of the shared statistics after a validation loop of ``name``."""
    if name == HOOK:  # NormalizationStats
        return float(obj.pixel.min), float(obj.pixel.max)
    if name == SHIM:
        return tuple(map(float, obj.read()["pixel"]))
    return float(obj[0]), float(obj[1])


def stats_agree(label: str, stats: dict[str, tuple[float, float]]) -> str:
    """``agree`` for validation loops: every ``(min, max)`` must equal the hook's exactly."""
    ref = stats[HOOK]
    return agree(
        f"{label}, (min, max) against the hook's {ref}",
        {k: max(abs(a - b) for a, b in zip(v, ref, strict=True)) for k, v in stats.items()},
        tol=0.0,
    )


# -- test: normalization ------------------------------------------------------------------


def fitted_hook(val: list[Batch], **kwargs: Any) -> Any:
    """A Flax hook whose statistics come from the batches ``val``, ready to test."""
    hook = jaxnorm.MinMaxNormalizationHook(
        image_threshold=IMAGE_THRESHOLD, pixel_threshold=PIXEL_THRESHOLD, **kwargs
    )
    hook_validation(hook, val, len(val))()
    hook.on_test_start()
    return hook


def fitted_shim(val: list[Batch], **kwargs: Any) -> tuple[Any, Any]:
    """A shim callback and module whose statistics come from ``val``, ready to test."""
    cb, pm = shim_class()(**kwargs), pl_module()
    cb.setup(None, pm, stage="fit")
    shim_validation(cb, pm, val, len(val))()
    cb.on_test_start(None, pm)
    return cb, pm


def fitted_anomalib(val: list[Batch]) -> tuple[Any, Any]:
    """anomalib 0.7's callback and a module whose metric saw ``val``."""
    cb, pm = anomalib_ref.MinMaxNormalizationCallback(), pl_module()
    anomalib_validation(cb, pm, val, len(val))()
    return cb, pm


def hook_test(hook: Any, pool: list[Batch], n: int) -> Callable[[], Batch]:
    """``n`` test batches through the Flax hook; returns the last normalized outputs."""

    def run():
        out = None
        for i in range(n):
            out = hook.on_test_batch_end(pool[i % len(pool)])
        return out

    return run


def callback_test(cb: Any, pm: Any, pool: list[Batch], n: int) -> Callable[[], Batch]:
    """``n`` test batches through a Lightning-style callback (shim or anomalib's)."""

    def run():
        out = None
        for i in range(n):
            # The callbacks rewrite their dict in place: each batch gets a fresh dict.
            out = dict(pool[i % len(pool)])
            cb.on_test_batch_end(None, pm, out, None, i, 0)
        return out

    return run


def callback_test_fresh(cb: Any, pm: Any, pool: list[Batch], n: int) -> Callable[[], Batch]:
    """``callback_test`` with new tensors every batch, as a model's outputs are.

    Each batch's tensors are clones of a pool batch, made in the loop, so that no callback
    meets a tensor it has seen; ``cb=None`` times the clones alone.
    """

    def run():
        out = None
        for i in range(n):
            out = {k: v.clone() for k, v in pool[i % len(pool)].items()}
            if cb is not None:
                cb.on_test_batch_end(None, pm, out, None, i, 0)
        return out

    return run


def as_numpy(outputs: Batch) -> dict[str, np.ndarray]:
    """Outputs of any contender as float32 numpy arrays."""
    return {
        k: (v.float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32))
        for k, v in outputs.items()
    }


def max_diff(a: Batch, b: Batch) -> float:
    """The largest absolute difference between two contenders' outputs, over every key."""
    a, b = as_numpy(a), as_numpy(b)
    if a.keys() != b.keys():
        return float("inf")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def agree(label: str, diffs: dict[str, float], tol: float = 1e-5) -> str:
    """A note saying whether contenders agree with the first (they must, to be compared)."""
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    worst = max(diffs.values(), default=0.0)
    return f"{label}: " + (
        f"agree (max abs diff {worst:.2g})" if not bad else f"DISAGREE (max abs diff: {bad})"
    )


# -- what the final sync relies on ----------------------------------------------------------


@jax.jit
def _slow(x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ x.T).sum()


@jax.jit
def _fast(y: jax.Array) -> jax.Array:
    return y + 1


def in_order_note() -> str:
    """Checks that a fast call dispatched after a slow, independent one finishes after it.

    The pipelined cases sync on their last outputs only; that covers every batch when the
    backend runs executions in dispatch order.
    """
    x, y = base.to_jax(np.ones((1500, 1500), np.float32)), base.to_jax(np.ones(3, np.float32))
    jax.block_until_ready((_slow(x), _fast(y)))
    t0 = time.perf_counter()
    a = _slow(x)
    dispatch = time.perf_counter() - t0
    b = _fast(y)
    b.block_until_ready()
    in_order = a.is_ready()
    a.block_until_ready()
    total = time.perf_counter() - t0
    return (
        f"Dispatch order on {environment.jax_device().platform}: a {total * 1e3:.0f} ms call "
        f"returned to Python in {dispatch * 1e3:.2f} ms (asynchronous dispatch), and a fast "
        f"call dispatched after it was ready {'only after' if in_order else 'BEFORE'} it, so "
        + (
            "one sync on a loop's last outputs waits for every batch."
            if in_order
            else "executions may overlap: a final sync may not cover every batch."
        )
    )
