"""Case ``fused``: ``update_stats`` / ``normalize_outputs`` inside a Flax eval step's jit.

The eval step is a ``flax.linen`` module with a PaDiM-like head (a per-pixel Gaussian distance
to a learned mean, image score = the map's max) on (32, 1, 256, 256) inputs. Its compute is
as light as a step can be, an elementwise map and one reduction, so what the folded-in
normalization costs shows at its largest. Each timed call runs many steps and syncs once (as
in the ``pipeline`` case); rows are per step. Contenders: the step with the statistics
folded (validation) or the outputs normalized (test) in its jit, the step followed by the
Flax hook, and the step alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from benchmarks import timing
from benchmarks.cases import base, loops, pipeline
from benchmarks.records import CaseResult, timed_rows

KEY = "fused"
TITLE = "a Flax eval step with update_stats / normalize_outputs in its jit vs the step alone"

FUSED_VAL = "eval step + update_stats in one jit"
FUSED_TEST = "eval step + normalize_outputs in one jit"
THEN_HOOK = "eval step, then the hook"
STEP = "eval step alone"
GPU_BOUND = 1.1


class GaussianScorer(nn.Module):
    """A PaDiM-like head: squared distance of each pixel to a learned mean, scaled."""

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        mean = self.param("mean", nn.initializers.zeros, x.shape[1:])
        inv_var = self.param("inv_var", nn.initializers.ones, x.shape[1:])
        maps = jnp.square(x - mean) * inv_var
        return {"anomaly_maps": maps, "pred_scores": jnp.max(maps, axis=(1, 2, 3))}


MODEL = GaussianScorer()


@jax.jit
def eval_step(variables, x):
    return MODEL.apply(variables, x)


@jax.jit
def eval_step_update(variables, x, stats):
    outputs = MODEL.apply(variables, x)
    return outputs, jaxnorm.update_stats(stats, outputs)


@jax.jit
def eval_step_normalize(variables, x, stats, image_threshold, pixel_threshold):
    outputs = MODEL.apply(variables, x)
    return jaxnorm.normalize_outputs(outputs, stats, image_threshold, pixel_threshold)


def _variables(shape: tuple[int, ...]) -> dict:
    mean = base.raw_scores(shape[1:], seed=81)
    inv_var = 1.0 / (1.0 + base.raw_scores(shape[1:], seed=82))
    return {"params": {"mean": base.to_jax(mean), "inv_var": base.to_jax(inv_var)}}


def _rows(res, cfg, group, contenders, n):
    timings = timing.compare(contenders, pipeline.timer(cfg))
    res.rows += timed_rows(
        group, contenders, {k: timing.per_item(t, n) for k, t in timings.items()}
    )


def run(cfg: base.RunConfig) -> CaseResult:
    """Times validation and test steps, fused and not, per step."""
    res = CaseResult(key=KEY, title=TITLE)
    n = pipeline.QUICK_BATCHES if cfg.quick else pipeline.BATCHES
    shape = base.MAPS_256
    variables = _variables(shape)
    xs = [base.to_jax(base.raw_scores(shape, seed=90 + i)) for i in range(loops.POOL)]

    # -- validation ---------------------------------------------------------------------
    hook = jaxnorm.MinMaxNormalizationHook(
        image_threshold=loops.IMAGE_THRESHOLD, pixel_threshold=loops.PIXEL_THRESHOLD
    )

    def fused_val():
        stats = jaxnorm.NormalizationStats.empty()
        for i in range(n):
            _, stats = eval_step_update(variables, xs[i % len(xs)], stats)
        return stats

    def hook_val():
        hook.on_validation_epoch_start()
        for i in range(n):
            hook.on_validation_batch_end(eval_step(variables, xs[i % len(xs)]))
        hook.on_validation_epoch_end()
        return hook.stats

    def step_only():
        out = None
        for i in range(n):
            out = eval_step(variables, xs[i % len(xs)])
        return out

    fused_stats, hook_stats = fused_val(), hook_val()
    diff = max(
        abs(float(fused_stats.pixel.min) - float(hook_stats.pixel.min)),
        abs(float(fused_stats.pixel.max) - float(hook_stats.pixel.max)),
    )
    val_group = f"validation, {n} steps on {shape}"
    res.notes.append(loops.agree(f"{val_group}, (min, max) fused vs hook", {FUSED_VAL: diff}, 0.0))
    _rows(
        res,
        cfg,
        val_group,
        [
            timing.Contender(FUSED_VAL, fused_val, role="jaxnorm"),
            timing.Contender(THEN_HOOK, hook_val, role="jaxnorm"),
            timing.Contender(STEP, step_only, role="roofline"),
        ],
        n,
    )

    # -- test ------------------------------------------------------------------------------
    hook.on_test_start()
    stats = hook.stats
    thresholds = (
        base.to_jax(np.float32(loops.IMAGE_THRESHOLD)),
        base.to_jax(np.float32(loops.PIXEL_THRESHOLD)),
    )

    def fused_test():
        out = None
        for i in range(n):
            out = eval_step_normalize(variables, xs[i % len(xs)], stats, *thresholds)
        return out

    def hook_test():
        out = None
        for i in range(n):
            out = hook.on_test_batch_end(eval_step(variables, xs[i % len(xs)]))
        return out

    test_group = f"test, {n} steps on {shape}"
    res.notes.append(
        loops.agree(
            f"{test_group}, last outputs fused vs hook",
            {FUSED_TEST: loops.max_diff(fused_test(), hook_test())},
        )
    )
    _rows(
        res,
        cfg,
        test_group,
        [
            timing.Contender(FUSED_TEST, fused_test, role="jaxnorm"),
            timing.Contender(THEN_HOOK, hook_test, role="jaxnorm"),
            timing.Contender(STEP, step_only, role="roofline"),
        ],
        n,
    )

    for group, name in ((val_group, FUSED_VAL), (test_group, FUSED_TEST)):
        res.add_ratio_target(
            f"GPU: fused eval step, {group}: time / step alone",
            group,
            name,
            STEP,
            "<=",
            GPU_BOUND,
            platform="gpu",
        )
    res.notes.append(
        f"Best blocks: fused validation {res.ratio(val_group, FUSED_VAL, STEP):.2f}x and fused "
        f"test {res.ratio(test_group, FUSED_TEST, STEP):.2f}x the step alone; step then hook "
        f"{res.ratio(val_group, THEN_HOOK, STEP):.2f}x and "
        f"{res.ratio(test_group, THEN_HOOK, STEP):.2f}x."
    )
    return res
