"""Case ``ragged``: box scores with a different number of boxes per image and per batch.

``jax.jit`` compiles once per input shape, so ragged scores are where a naive port recompiles
on every batch. Each phase is run once cold (caches cleared, compilations counted), then
timed warm; the warm rounds count compilations too, which must be zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
import jaxnorm.testing
from benchmarks import anomalib_ref, environment, timing
from benchmarks import labels as L
from benchmarks.cases import base, loops
from benchmarks.records import CaseResult, timed_rows

KEY = "ragged"
TITLE = "ragged box scores: jaxnorm hook vs per-tensor jaxnorm loop vs torch eager loop"

HOOK = L.HOOK_CLASS
JAX_LOOP = "jaxnorm per tensor (concat for stats)"
TORCH_LOOP = L.ANOMALIB_CALLBACK_EAGER

IMAGES, MAX_BOXES = 32, 64
IMAGE_THRESHOLD, PIXEL_THRESHOLD = loops.IMAGE_THRESHOLD, loops.PIXEL_THRESHOLD

Batch = dict[str, Any]


def _batches(n: int, max_boxes: int, seed: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        counts = rng.integers(0, max_boxes + 1, size=IMAGES)
        boxes = [rng.gamma(2.0, 0.5, size=int(c)).astype(np.float32) for c in counts]
        out.append((rng.gamma(2.0, 0.5, size=IMAGES).astype(np.float32), boxes))
    return out


def _as_jax(batches) -> list[Batch]:
    return [
        {"pred_scores": base.to_jax(p), "box_scores": [base.to_jax(b) for b in bs]}
        for p, bs in batches
    ]


def _as_torch(batches) -> list[Batch]:
    return [
        {"pred_scores": base.to_torch(p), "box_scores": [base.to_torch(b) for b in bs]}
        for p, bs in batches
    ]


def _cold(fn: Callable[[], Any], sync: Callable[[Any], None], clear: bool) -> tuple[float, int]:
    """Seconds and XLA compilations of the first pass, every jax cache cleared if ``clear``."""
    if clear:
        jax.clear_caches()
    with jaxnorm.testing.count_compiles() as log:
        t0 = time.perf_counter()
        sync(fn())
        dt = time.perf_counter() - t0
    return dt, log.count


def _phases(n: int, max_boxes: int):
    """The validation and test phase of each contender, as zero-argument functions."""
    val, test = _batches(n, max_boxes, seed=1), _batches(n, max_boxes, seed=2)
    val_j, test_j, val_t, test_t = _as_jax(val), _as_jax(test), _as_torch(val), _as_torch(test)
    dev = environment.torch_device()

    # Per-tensor jaxnorm: concatenation makes a new length, and a compile, per batch.
    def jax_val():
        stats = jaxnorm.MinMax.empty()
        for o in val_j:
            stats = stats.update(jnp.concatenate(o["box_scores"]))
        return stats

    stats = jax_val()
    lo, hi = float(stats.min), float(stats.max)

    def jax_test():
        return [
            {
                "pred_scores": jaxnorm.normalize(o["pred_scores"], IMAGE_THRESHOLD, lo, hi),
                "box_scores": [
                    jaxnorm.normalize(b, PIXEL_THRESHOLD, lo, hi) for b in o["box_scores"]
                ],
            }
            for o in test_j
        ]

    cb = anomalib_ref.MinMaxNormalizationCallback()
    pm = loops.pl_module()

    def torch_val():
        pm.normalization_metrics = anomalib_ref.MinMax().to(dev)
        for o in val_t:
            cb.on_validation_batch_end(None, pm, o, None, 0, 0)
        return pm.normalization_metrics.compute()

    torch_val()

    def torch_test():
        outs = [dict(o) for o in test_t]
        for o in outs:
            cb.on_test_batch_end(None, pm, o, None, 0, 0)
        return outs

    hook = jaxnorm.MinMaxNormalizationHook(
        image_threshold=IMAGE_THRESHOLD, pixel_threshold=PIXEL_THRESHOLD
    )

    def hook_val():
        hook.on_validation_epoch_start()
        for o in val_j:
            hook.on_validation_batch_end(o)
        hook.on_validation_epoch_end()
        hook.on_test_start()
        return hook.stats

    hook_val()

    def hook_test():
        return [hook.on_test_batch_end(dict(o)) for o in test_j]

    return {
        "validation": {HOOK: hook_val, JAX_LOOP: jax_val, TORCH_LOOP: torch_val},
        "test": {HOOK: hook_test, JAX_LOOP: jax_test, TORCH_LOOP: torch_test},
    }


def _sync_for(name: str) -> Callable[[Any], None]:
    return base.torch_sync() if name == TORCH_LOOP else timing.sync_jax


def run(cfg: base.RunConfig) -> CaseResult:
    """Times validation and test over ragged batches, cold and warm, with compile counts."""
    res = CaseResult(
        key=KEY, title=TITLE, columns=["cold 1st pass", "compiles cold", "compiles warm"]
    )
    # Quick runs cut the batches and the distinct lengths: each naive compile costs ~0.1 s.
    n, max_boxes = (4, 8) if cfg.quick else (200, MAX_BOXES)
    phases = _phases(n, max_boxes)
    timer = timing.TimerConfig(rounds=3 if cfg.quick else 5, block_s=0.0, warmup_s=0.0)
    for phase, fns in phases.items():
        group = f"{phase}, {n} batches x {IMAGES} images"
        # Clearing the caches for one contender drops the others' compilations, which must then
        # be redone before timing: the torch loop clears nothing, and the naive loop (hundreds
        # of compilations) goes last so that its caches survive.
        cold = {}
        for name in sorted(fns, key=[TORCH_LOOP, HOOK, JAX_LOOP].index):
            cold[name] = _cold(fns[name], _sync_for(name), clear=name != TORCH_LOOP)
        warm = {}
        for name, fn in fns.items():
            _sync_for(name)(fn())  # refills what a later contender's clear_caches() dropped
            with jaxnorm.testing.count_compiles() as log:
                _sync_for(name)(fn())
            warm[name] = log.count
        contenders = [
            timing.Contender(
                name, fn, sync=_sync_for(name), role="jaxnorm" if name == HOOK else "baseline"
            )
            for name, fn in fns.items()
        ]
        with jaxnorm.testing.count_compiles() as timed_log:
            timings = timing.compare(contenders, timer)
        if timed_log.count:
            res.notes.append(
                f"{phase}: {timed_log.count} compilations during the timed "
                f"rounds: {sorted(set(timed_log.names))}"
            )
        res.rows += timed_rows(
            group,
            contenders,
            timings,
            extra={
                name: {
                    "cold 1st pass": f"{cold[name][0]:.3g} s",
                    "compiles cold": cold[name][1],
                    "compiles warm": warm[name],
                }
                for name in timings
            },
        )
    res.notes.append(
        f"Box counts per image uniform in 0..{max_boxes}; 'compiles cold' counts every XLA "
        "compilation of the first pass after jax.clear_caches(), eager ops included; "
        "'compiles warm' those of one more pass once warm."
    )
    return res
