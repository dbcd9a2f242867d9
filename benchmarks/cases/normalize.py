"""Case ``normalize``: ``jaxnorm.normalize`` against anomalib's eager torch, numpy and a roofline.

The roofline is the cheapest jitted program that reads the input and writes an output of the
same size, ``x * s`` with ``s`` traced so that XLA cannot fold it away: no normalization can
move fewer bytes, so ``jaxnorm / roofline`` is how far from memory-bound it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxnorm
from benchmarks import anomalib_ref, environment, timing
from benchmarks import labels as L
from benchmarks.cases import base
from benchmarks.records import CaseResult, timed_rows

KEY = "normalize"
TITLE = "normalize: jaxnorm vs anomalib 0.7 eager torch, numpy and a read+write roofline"

JAXNORM = L.NORMALIZE
JAXNORM_FLOATS = "jaxnorm.normalize, float stats"
TORCH = L.ANOMALIB_NORMALIZE
NUMPY = "numpy, same formula"
ROOFLINE = "roofline: jit(x * s)"

THRESHOLD = 1.0


@jax.jit
def _roofline(x: jax.Array, s: jax.Array) -> jax.Array:
    # One read and one write of x; ``s`` is traced, so the multiply cannot be folded away.
    return x * s.astype(x.dtype)


def _check_agree(out: dict[str, np.ndarray], dtype: str) -> str:
    """Says whether the contenders compute the same numbers (they must, to be compared)."""
    ref = out[TORCH].astype(np.float32)
    tol = 1e-2 if dtype == "bfloat16" else 1e-5
    worst = {k: float(np.max(np.abs(v.astype(np.float32) - ref))) for k, v in out.items()}
    bad = {k: v for k, v in worst.items() if not v <= tol}
    return "agree" if not bad else f"DISAGREE (max abs diff vs torch: {bad})"


def run(cfg: base.RunConfig) -> CaseResult:
    """Times normalization of scores and maps in float32 and bfloat16."""
    res = CaseResult(key=KEY, title=TITLE, columns=["GB/s", "faults/call"])
    shapes = [base.SCORES, base.MAPS_256] + ([] if cfg.quick else [base.MAPS_512])
    tsync = base.torch_sync()
    dev = environment.torch_device()
    agreement = []
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            group = L.array_group(shape, dtype)
            x_np = base.raw_scores(shape, dtype)
            x, xt = base.to_jax(x_np), base.to_torch(x_np)
            # Statistics as the README shows them: jax scalars straight from MinMax.
            stats = jaxnorm.MinMax.empty().update(x)
            lo, hi = float(stats.min), float(stats.max)
            t_thr, t_lo, t_hi = (torch.tensor(v, device=dev) for v in (THRESHOLD, lo, hi))
            s = jnp.float32(1.0)

            contenders = [
                timing.Contender(
                    JAXNORM,
                    lambda x=x, st=stats: jaxnorm.normalize(x, THRESHOLD, st.min, st.max),
                    role="jaxnorm",
                ),
                timing.Contender(
                    JAXNORM_FLOATS,
                    lambda x=x, lo=lo, hi=hi: jaxnorm.normalize(x, THRESHOLD, lo, hi),
                    role="jaxnorm",
                ),
                timing.Contender(
                    TORCH,
                    lambda xt=xt, a=t_thr, b=t_lo, c=t_hi: anomalib_ref.normalize(xt, a, b, c),
                    sync=tsync,
                ),
                timing.Contender(
                    NUMPY,
                    lambda x_np=x_np, lo=lo, hi=hi: anomalib_ref.normalize(x_np, THRESHOLD, lo, hi),
                    sync=timing.no_sync,
                ),
                timing.Contender(ROOFLINE, lambda x=x, s=s: _roofline(x, s), role="roofline"),
            ]
            outs = {
                c.name: np.asarray(c.fn().float().cpu() if c.name == TORCH else c.fn())
                for c in contenders
                if c.name != ROOFLINE
            }
            agreement.append(f"{group}: {_check_agree(outs, dtype)}")

            timings = timing.compare(contenders, cfg.timer)
            compiles = {
                JAXNORM: timing.measure_compile(
                    lambda x, t, a, b: jaxnorm.normalize(x, t, a, b),
                    x,
                    THRESHOLD,
                    stats.min,
                    stats.max,
                ),
                ROOFLINE: timing.measure_compile(_roofline, x, s),
            }
            res.rows += timed_rows(
                group, contenders, timings, compile=compiles, bytes_moved=2 * x.nbytes
            )

            if dtype == "float32" and shape in (base.SCORES, base.MAPS_256):
                res.add_ratio_target(
                    f"CPU: normalize {group} with jax-array statistics: time / float-"
                    "statistics time",
                    group,
                    JAXNORM,
                    JAXNORM_FLOATS,
                    "<=",
                    1.3,
                    platform="cpu",
                )
            if shape == base.MAPS_256 and dtype == "float32":
                res.add_ratio_target(
                    f"normalize {group}: eager torch time / jaxnorm time",
                    group,
                    TORCH,
                    JAXNORM,
                    ">=",
                    6.0,
                )
                res.add_ratio_target(
                    f"normalize {group}: jaxnorm time / roofline time",
                    group,
                    JAXNORM,
                    ROOFLINE,
                    "<=",
                    1.3,
                )
    res.notes.append("Outputs checked equal before timing: " + "; ".join(agreement) + ".")
    res.notes.append(
        "GB/s counts one read of the input and one write of the output (2 x nbytes) over the "
        "median time. `jaxnorm.normalize` gets its min/max as jax scalars from `MinMax` (the "
        "README's usage); the `float stats` row passes Python floats. faults/call counts "
        "minor page faults: glibc maps every allocation of 32 MiB or more afresh, so the "
        "(32, 1, 512, 512) float32 outputs fault in 8192 new pages per call, which bounds "
        "jaxnorm and the roofline alike."
    )
    return res
