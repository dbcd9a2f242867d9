"""Case ``overhead``: host work per batch at tiny sizes, against one jitted call (the floor).

With 32 scores and (32, 1, 8, 8) maps the kernels take a few microseconds, so what a batch
costs is the host's work: Python checks, pytree handling and dispatches. On CPU this is what
a GPU's per-batch cost is made of at real sizes. The floor is the least any per-batch hook can
do: one ``jax.jit`` over the whole outputs dict, ``jaxnorm.normalize_outputs`` (test) or
``jaxnorm.update_stats`` (validation), with thresholds and statistics already on the device.
Loops are pipelined as in the ``pipeline`` case: many batches, one sync at the end.
"""

from __future__ import annotations

import jax
import numpy as np

import jaxnorm
from benchmarks import timing
from benchmarks.cases import base, loops, pipeline
from benchmarks.records import CaseResult, timed_rows

KEY = "overhead"
TITLE = (
    "host overhead per batch at tiny sizes (32 scores + (32, 1, 8, 8) maps), pipelined: "
    "hook and shim vs one jitted call over the dict"
)

FLOOR_TEST = "floor: jit(normalize_outputs), device scalars"
FLOOR_VAL = "floor: jit(update_stats), state chained"
BOUND = 1.5


@jax.jit
def _floor_test(outputs, stats, image_threshold, pixel_threshold):
    return jaxnorm.normalize_outputs(outputs, stats, image_threshold, pixel_threshold)


@jax.jit
def _floor_update(stats, outputs):
    return jaxnorm.update_stats(stats, outputs)


def _test(res: CaseResult, cfg: base.RunConfig, n: int) -> str:
    group = f"test, {n} batches"
    val, test = (
        loops.make_pool(pipeline.TINY_MAPS, seed=50),
        loops.make_pool(pipeline.TINY_MAPS, 60),
    )
    hook = loops.fitted_hook(val.jax)
    shim, shim_pm = loops.fitted_shim(val.torch)
    stats = hook.stats  # device-resident, as the floor wants them
    thresholds = (
        base.to_jax(np.float32(loops.IMAGE_THRESHOLD)),
        base.to_jax(np.float32(loops.PIXEL_THRESHOLD)),
    )

    def floor():
        out = None
        for i in range(n):
            out = _floor_test(test.jax[i % len(test.jax)], stats, *thresholds)
        return out

    contenders = [
        timing.Contender(loops.HOOK, loops.hook_test(hook, test.jax, n), role="jaxnorm"),
        timing.Contender(
            loops.SHIM,
            loops.callback_test(shim, shim_pm, test.torch, n),
            sync=timing.sync_all,
            role="jaxnorm",
        ),
        timing.Contender(FLOOR_TEST, floor, role="roofline"),
    ]
    outs = {c.name: c.fn() for c in contenders}
    res.notes.append(
        loops.agree(
            f"{group}, last batch against the hook",
            {k: loops.max_diff(v, outs[loops.HOOK]) for k, v in outs.items()},
        )
    )
    timings = timing.compare(contenders, pipeline.timer(cfg))
    res.rows += timed_rows(
        group, contenders, {k: timing.per_item(t, n) for k, t in timings.items()}
    )
    return group


def _validation(res: CaseResult, cfg: base.RunConfig, n: int) -> str:
    group = f"validation, {n} batches"
    val = loops.make_pool(pipeline.TINY_MAPS, seed=70)
    hook = jaxnorm.MinMaxNormalizationHook()
    shim, shim_pm = loops.shim_class()(), loops.pl_module()
    shim.setup(None, shim_pm, stage="fit")

    def floor():
        stats = jaxnorm.NormalizationStats.empty()
        for i in range(n):
            stats = _floor_update(stats, val.jax[i % len(val.jax)])
        return stats

    fns = {
        loops.HOOK: loops.hook_validation(hook, val.jax, n),
        loops.SHIM: loops.shim_validation(shim, shim_pm, val.torch, n),
        FLOOR_VAL: floor,
    }
    got = {
        loops.HOOK: loops.validation_stats(loops.HOOK, fns[loops.HOOK]()),
        loops.SHIM: loops.validation_stats(loops.SHIM, fns[loops.SHIM]()),
        FLOOR_VAL: loops.validation_stats(loops.HOOK, fns[FLOOR_VAL]()),
    }
    res.notes.append(loops.stats_agree(group, got))
    contenders = [
        timing.Contender(loops.HOOK, fns[loops.HOOK], role="jaxnorm"),
        timing.Contender(loops.SHIM, fns[loops.SHIM], sync=timing.sync_all, role="jaxnorm"),
        timing.Contender(FLOOR_VAL, floor, role="roofline"),
    ]
    timings = timing.compare(contenders, pipeline.timer(cfg))
    res.rows += timed_rows(
        group, contenders, {k: timing.per_item(t, n) for k, t in timings.items()}
    )
    return group


def run(cfg: base.RunConfig) -> CaseResult:
    """Times the hook and the shim against the one-call floor, for test and validation."""
    res = CaseResult(key=KEY, title=TITLE)
    n = pipeline.QUICK_BATCHES if cfg.quick else pipeline.BATCHES
    test = _test(res, cfg, n)
    val = _validation(res, cfg, n)
    res.add_ratio_target(
        f"CPU: hook per batch at tiny sizes, {test}: time / one-call floor",
        test,
        loops.HOOK,
        FLOOR_TEST,
        "<=",
        BOUND,
        platform="cpu",
    )
    res.add_ratio_target(
        f"CPU: hook per batch at tiny sizes, {val}: time / one-call floor",
        val,
        loops.HOOK,
        FLOOR_VAL,
        "<=",
        BOUND,
        platform="cpu",
    )
    res.notes.append(
        "The validation floor folds the statistics only; the hook also counts non-finite "
        "values (nonfinite='raise') and runs the epoch start and end hooks once per loop. "
        "The shim adds the torch <-> jax exchange of every tensor and, at epoch end, the "
        "write of its statistics to the module."
    )
    return res
