"""``jaxnorm.normalize`` with jax-array statistics against the same call with float ones.

The README's usage, ``normalize(x, t, stats.min, stats.max)``, once read the arrays on the
host at every call. Interleaved rounds of ``--calls`` calls on 32 x 1 x 8 x 8 maps (host
work is all there is), one sync per round; prints microseconds per call and the ratio.

  PYTHONPATH=$PWD python benchmarks/probes/normalize_stats_probe.py [--calls 500] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import jaxnorm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    maps = np.random.default_rng(0).gamma(2, 0.5, (32, 1, 8, 8)).astype(np.float32)
    x = jax.block_until_ready(jax.numpy.asarray(maps))
    stats = jax.block_until_ready(jaxnorm.MinMax.empty().update(x))
    lo, hi = stats.min, stats.max
    flo, fhi = float(lo), float(hi)
    n = args.calls

    def arrays():
        for _ in range(n):
            y = jaxnorm.normalize(x, 0.9, lo, hi)
        return y

    def floats():
        for _ in range(n):
            y = jaxnorm.normalize(x, 0.9, flo, fhi)
        return y

    np.testing.assert_array_equal(np.asarray(arrays()), np.asarray(floats()))
    times = {"array stats": [], "float stats": []}
    for _ in range(args.rounds):
        for name, fn in (("array stats", arrays), ("float stats", floats)):
            t0 = time.perf_counter_ns()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter_ns() - t0) / n / 1e3)
    for name, ts in times.items():
        print(f"{name}: best {min(ts):.1f} us, median {statistics.median(ts):.1f} us per call")
    a, f = times["array stats"], times["float stats"]
    print(
        f"array / float stats: {min(a) / min(f):.2f} (best), "
        f"{statistics.median(a) / statistics.median(f):.2f} (median)"
    )


if __name__ == "__main__":
    main()
