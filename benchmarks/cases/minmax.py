"""Case ``minmax``: ``MinMax.update`` against anomalib's two torch reductions and one ``jnp.max``.

The roofline is a single jitted ``jnp.max``: one read of the input, the least any min/max can
cost. ``jnp.min + jnp.max`` shows what two sibling reductions cost when the backend does not
fuse them; the variadic ``lax.reduce`` is the single-pass formulation in pure JAX. The "eval
step" group folds ``update`` into the jit that produces the maps, as a Flax eval step would.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import jaxnorm
from benchmarks import anomalib_ref, environment, timing
from benchmarks import labels as L
from benchmarks.cases import base
from benchmarks.records import CaseResult, timed_rows

KEY = "minmax"
TITLE = "MinMax.update: jaxnorm vs anomalib 0.7 (torch.max + torch.min), torch.aminmax, jnp.max"

EAGER = L.UPDATE
IN_JIT = "state.update(x) inside a user jit"
TORCH = L.ANOMALIB_UPDATE
AMINMAX = "torch.aminmax"
TWO_PASS = "jit(jnp.min, jnp.max), no finite check"
VARIADIC = "jit(variadic lax.reduce min/max), one pass"
NAN_BATCH = "MinMax.update, batch with one NaN"
ROOFLINE = "roofline: jit(jnp.max)"

FUSED = "eval step + update in one jit"
SEPARATE = "eval step, then update"
STEP_ONLY = "eval step alone"


@jax.jit
def _user_update(state: jaxnorm.MinMax, x: jax.Array) -> jaxnorm.MinMax:
    return state.update(x)


@jax.jit
def _two_pass(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.min(x), jnp.max(x)


@jax.jit
def _variadic(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # One reduction with two accumulators: a single read of x, if the backend emits it well.
    inf = jnp.array(jnp.inf, x.dtype)
    return lax.reduce(
        (x, x),
        (inf, -inf),
        lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
        tuple(range(x.ndim)),
    )


_roofline = jax.jit(jnp.max)


def _step(x: jax.Array, mean: jax.Array, inv_var: jax.Array) -> jax.Array:
    # A PaDiM-like per-pixel Gaussian distance: a cheap elementwise map of the input.
    return jnp.square(x - mean) * inv_var


_step_jit = jax.jit(_step)


@jax.jit
def _step_and_update(state, x, mean, inv_var):
    maps = _step(x, mean, inv_var)
    return maps, state.update(maps)


def _input_reads(hlo: str, shape: tuple[int, ...]) -> int:
    """Counts the kernels of the entry computation that take the full-size input directly.

    Each is one pass over the input in memory: two means XLA did not fuse the reductions.
    """
    dims = ",".join(map(str, shape))
    entry = hlo[hlo.index("ENTRY") :]
    params = re.findall(rf"(%[\w.]+) = \w+\[{dims}\]\S* parameter\(", entry)
    n = 0
    for line in entry.splitlines():
        if " parameter(" in line or re.search(
            r"= \S+ (tuple|conditional|get-tuple-element)\(", line
        ):
            continue
        n += any(re.search(rf"[(,\s]{re.escape(p)}[,)]", line) for p in params)
    return n


def _evidence(x: jax.Array) -> list[str]:
    """Compiled-HLO facts that explain the timings: passes over the input and bytes moved."""
    mb = x.nbytes / 1e6
    facts = []
    for name, fn, args in (
        ("jnp.max", _roofline, (x,)),
        ("jnp.min + jnp.max", _two_pass, (x,)),
        ("MinMax.update (fast path)", _user_update, (jaxnorm.MinMax.empty(), x)),
        ("variadic lax.reduce", _variadic, (x,)),
    ):
        compiled = fn.lower(*args).compile()
        text = compiled.as_text()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        reads = _input_reads(text, tuple(x.shape))
        facts.append(
            f"HLO of {name}: {reads} kernel(s) read the {mb:.1f} MB input directly, "
            f"{text.count('__ynn_fusion')} YNNPACK fusion(s) in the module, XLA cost "
            f"analysis {cost.get('bytes accessed', 0) / 1e6:.1f} MB accessed (all "
            "branches)"
        )
    with_nan = x.at[(0,) * x.ndim].set(jnp.nan)
    facts.append(
        f"NaN propagation on this backend: jit(jnp.max) of the input with one NaN "
        f"gives {float(_roofline(with_nan))}, the variadic reduce gives "
        f"{float(_variadic(with_nan)[1])} (XLA semantics: nan)"
    )
    return facts


def run(cfg: base.RunConfig) -> CaseResult:
    """Times min/max accumulation over anomaly maps and inside an eval step."""
    res = CaseResult(key=KEY, title=TITLE, columns=["GB/s", "faults/call"])
    tsync = base.torch_sync()
    dev = environment.torch_device()
    shapes = [base.MAPS_256] + ([] if cfg.quick else [base.MAPS_512])
    for shape in shapes:
        group = L.array_group(shape, "float32")
        x_np = base.raw_scores(shape)
        x, xt = base.to_jax(x_np), base.to_torch(x_np)
        metric = anomalib_ref.MinMax().to(dev)
        state = jaxnorm.MinMax.empty()
        contenders = [
            timing.Contender(EAGER, lambda x=x: jaxnorm.MinMax.empty().update(x), role="jaxnorm"),
            timing.Contender(IN_JIT, lambda x=x, s=state: _user_update(s, x), role="jaxnorm"),
            timing.Contender(TORCH, lambda xt=xt, m=metric: m.update(xt), sync=tsync),
            timing.Contender(AMINMAX, lambda xt=xt: torch.aminmax(xt), sync=tsync),
            timing.Contender(TWO_PASS, lambda x=x: _two_pass(x), role="probe"),
            timing.Contender(ROOFLINE, lambda x=x: _roofline(x), role="roofline"),
        ]
        x_nan = base.to_jax(np.where(np.arange(x_np.size).reshape(shape) == 7, np.nan, x_np))
        # The contract: non-finite values are skipped and counted (docs/differences.md).
        counted = int(state.update_and_count(x_nan)[1])
        res.notes.append(
            f"{group} with one NaN, non-finite values counted (expected 1): "
            f"MinMax.update_and_count {counted}"
        )
        if not cfg.quick:
            contenders += [
                timing.Contender(VARIADIC, lambda x=x: _variadic(x), role="probe"),
                timing.Contender(
                    NAN_BATCH, lambda x=x_nan: jaxnorm.MinMax.empty().update(x), role="probe"
                ),
            ]
        expected = (float(x_np.min()), float(x_np.max()))
        got = jaxnorm.MinMax.empty().update(x)
        for name, lo_hi in (("MinMax.update", (got.min, got.max)), ("variadic", _variadic(x))):
            if tuple(map(float, lo_hi)) != expected:
                raise RuntimeError(f"{name} gives {lo_hi}, numpy {expected}: not comparable")

        timings = timing.compare(contenders, cfg.timer)
        compiles = {
            IN_JIT: timing.measure_compile(lambda s, v: s.update(v), state, x),
            ROOFLINE: timing.measure_compile(jnp.max, x),
        }
        res.rows += timed_rows(group, contenders, timings, compile=compiles, bytes_moved=x.nbytes)
        if shape == base.MAPS_256:
            for name in (EAGER, IN_JIT):
                res.add_ratio_target(
                    f"{name} {group}: time / one jnp.max pass",
                    group,
                    name,
                    ROOFLINE,
                    "<=",
                    1.3,
                    note="XLA:CPU runs each reduction as its own YNNPACK kernel, with no "
                    "sibling fusion: min, max and the finiteness sum (YNNPACK's min/max drop "
                    "NaN) read the input three times (see the HLO notes)",
                )
            res.notes += _evidence(x)

    # The eval step: maps come out of a jit; update can ride in it or follow it.
    shape = base.MAPS_256
    group = f"eval step {shape} float32"
    x = base.to_jax(base.raw_scores(shape, seed=1))
    mean = base.to_jax(base.raw_scores((1, 1) + shape[2:], seed=2))
    inv_var = base.to_jax(1.0 / (1.0 + base.raw_scores((1, 1) + shape[2:], seed=3)))
    state = jaxnorm.MinMax.empty()

    def separate():
        maps = _step_jit(x, mean, inv_var)
        return maps, state.update(maps)

    contenders = [
        timing.Contender(FUSED, lambda: _step_and_update(state, x, mean, inv_var), role="jaxnorm"),
        timing.Contender(SEPARATE, separate),
        timing.Contender(STEP_ONLY, lambda: _step_jit(x, mean, inv_var), role="roofline"),
    ]
    timings = timing.compare(contenders, cfg.timer)
    # Reads x, writes maps; the small mean/inv_var stay in cache.
    res.rows += timed_rows(group, contenders, timings, bytes_moved=2 * x.nbytes)
    res.notes.append(
        f"Eval step (best blocks): fused costs {res.ratio(group, FUSED, STEP_ONLY):.2f}x the "
        f"step alone and {res.ratio(group, FUSED, SEPARATE):.2f}x the step followed by a "
        "separate update."
    )
    res.notes.append(
        "GB/s: min/max rows count one read of the input; eval-step rows count "
        "one read and one write."
    )
    return res
