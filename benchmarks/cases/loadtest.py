"""Case ``load``: 10,000 validation batches through the hook and the shim; memory must stay flat.

For every ``nonfinite`` x ``accumulate`` combination, 32 scores plus (32, 1, 8, 8) maps per
batch go through ``on_validation_batch_end`` in epochs of ``EPOCH`` batches (epoch start and
end hooks between them), with no sync inside the loop. Under ``"omit"`` one batch in
``loops.POOL`` carries a NaN; under ``"raise"`` every batch is clean. The run reports the XLA
compilations (all of them, and those after warm-up, which should be none), the time per
batch over each chunk of ``CHUNK`` batches after warm-up, and the growth of the resident set
(``VmRSS`` of ``/proc/self/status``, after ``gc.collect()``) and of the number of live jax
arrays from the end of warm-up to the last batch. The goals: RSS growth under
``RSS_BOUND_MIB`` and no growth of live arrays. Per-batch state that is kept
instead of folded (a list of device scalars, say) grows both, but small objects can fill
pages the allocator freed earlier without growing the RSS: the count of live arrays is the
signal nothing hides. Everything runs in one fresh subprocess
(``python -m benchmarks.cases.loadtest [--quick]``), so that the earlier cases' heap does
not depend on which cases ran before.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jaxnorm
import jaxnorm.testing
from benchmarks import timing
from benchmarks.cases import base, loops, pipeline
from benchmarks.records import CaseResult, Row, Target

KEY = "load"
TITLE = (
    "load test: 10,000 validation batches per nonfinite x accumulate combination, "
    "compilations, time per batch and RSS growth"
)

BATCHES, CHUNK, EPOCH = 10_000, 1_000, 200
QUICK_BATCHES, QUICK_CHUNK, QUICK_EPOCH = 400, 100, 50
RSS_BOUND_MIB = 5.0
MIB = 2**20
ROOT = pathlib.Path(__file__).resolve().parents[2]
COMBOS = [(nf, acc) for nf in ("raise", "omit") for acc in (False, True)]


def rss_bytes() -> int | None:
    """The resident set of this process (``VmRSS``), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass(frozen=True)
class Driver:
    """One contender's validation hooks, as callables.

    Attributes:
      start: the epoch start hook.
      batch: the batch end hook of batch ``i``.
      end: the epoch end hook.
      stats: the statistics as ``(min, max)`` floats (a host read).
      device_stats: the statistics as jax arrays, which depend on every batch so far.
      hook: the ``MinMaxNormalizationHook`` that does the work.
    """

    start: Callable[[], None]
    batch: Callable[[int], Any]
    end: Callable[[], None]
    stats: Callable[[], tuple[float, float]]
    device_stats: Callable[[], Any]
    hook: Any


def _drivers(nonfinite: str, accumulate: bool, pool: loops.Pool) -> dict[str, Driver]:
    kwargs = {"nonfinite": nonfinite, "accumulate": accumulate}
    hook = jaxnorm.MinMaxNormalizationHook(**kwargs)
    shim, pm = loops.shim_class()(**kwargs), loops.pl_module()
    shim.setup(None, pm, stage="fit")
    jb, tb = pool.jax, pool.torch
    return {
        loops.HOOK: Driver(
            start=hook.on_validation_epoch_start,
            batch=lambda i: hook.on_validation_batch_end(jb[i % len(jb)]),
            end=hook.on_validation_epoch_end,
            stats=lambda: loops.validation_stats(loops.HOOK, hook.stats),
            device_stats=lambda: hook.stats,
            hook=hook,
        ),
        loops.SHIM: Driver(
            start=lambda: shim.on_validation_epoch_start(None, pm),
            batch=lambda i: shim.on_validation_batch_end(
                None, pm, dict(tb[i % len(tb)]), None, i, 0
            ),
            end=lambda: shim.on_validation_epoch_end(None, pm),
            stats=lambda: loops.validation_stats(loops.SHIM, pm.normalization_metrics),
            # The shim's public ``hook`` holds the statistics as they are folded.
            device_stats=lambda: shim.hook.stats,
            hook=shim.hook,
        ),
    }


def _run(d: Driver, n: int, chunk: int, epoch: int) -> dict[str, Any]:
    """``n`` batches in epochs of ``epoch``; times and RSS at every ``chunk`` boundary."""
    if n % epoch or chunk % epoch:
        raise ValueError(f"{n} batches and chunks of {chunk} must be whole epochs of {epoch}")
    times, rss, live = [], [], []
    with jaxnorm.testing.count_compiles() as log:
        t0 = time.perf_counter()
        for i in range(n):
            if i % epoch == 0:
                d.start()
            d.batch(i)
            if (i + 1) % epoch == 0:
                d.end()
            if (i + 1) % chunk == 0:
                # A checkpoint at an epoch's end: wait for the work so far (the statistics
                # depend on every batch), then read the memory outside the timed span.
                timing.sync_jax(d.device_stats())
                times.append((time.perf_counter() - t0) / chunk)
                if i + 1 == chunk:
                    warm_compiles = log.count
                gc.collect()
                rss.append(rss_bytes())
                live.append(len(jax.live_arrays()))
                t0 = time.perf_counter()
        final = d.stats()
    return {
        "times": times[1:],  # the first chunk is warm-up
        "rss": rss,
        "live": live,
        "compiles": log.count,
        "compiles_after_warmup": log.count - warm_compiles,
        "stats": final,
    }


def _expected(pool: loops.Pool, accumulate: bool) -> tuple[float, float]:
    """numpy's min and max of the finite map values the loop saw (every pool batch)."""
    del accumulate  # each epoch sees the whole pool, so both policies agree
    maps = np.stack([b["anomaly_maps"] for b in pool.numpy])
    finite = maps[np.isfinite(maps)]
    return float(finite.min()), float(finite.max())


def run(cfg: base.RunConfig) -> CaseResult:
    """Runs the load test in a fresh process, so that no earlier case's freed heap (pages
    the allocator hands out again without growing the RSS) hides what the runs keep."""
    res = CaseResult(
        key=KEY,
        title=TITLE,
        columns=[
            "compiles",
            "compiles after warm-up",
            "RSS after warm-up",
            "RSS growth",
            "live arrays growth",
        ],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cases.loadtest"] + (["--quick"] if cfg.quick else []),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load test process failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data["skipped"]:
        res.skipped = data["skipped"]
        return res
    for r in data["rows"]:
        res.rows.append(
            Row(
                group=r["group"],
                name=r["name"],
                role="jaxnorm",
                timing=timing.Timing(number=r["number"], samples=tuple(r["samples"])),
                extra=r["extra"],
            )
        )
    res.targets += [Target(**t) for t in data["targets"]]
    res.notes += data["notes"]
    return res


def measure(quick: bool) -> dict[str, Any]:
    """The load test itself, in this process; returns plain data for ``run``."""
    data: dict[str, Any] = {"skipped": None, "rows": [], "targets": [], "notes": []}
    n, chunk, epoch = (
        (QUICK_BATCHES, QUICK_CHUNK, QUICK_EPOCH) if quick else (BATCHES, CHUNK, EPOCH)
    )
    if rss_bytes() is None:
        data["skipped"] = "/proc/self/status is not readable here: no RSS to report"
        return data
    loops.shim_class()  # Lightning's import, once, before the heap is frozen
    # Objects that exist now are not the runs' to free: frozen, they leave gc.collect()
    # (at every chunk) a few milliseconds of work instead of half a second.
    gc.collect()
    gc.freeze()
    try:
        checks = _combos(data, n, chunk, epoch)
    finally:
        gc.unfreeze()
    data["notes"].append(
        loops.agree(
            "final statistics (min, max) against numpy's min/max of the finite values",
            dict(checks),
            tol=0.0,
        )
    )
    data["notes"].append(
        f"One fresh process runs every combination, the hook's run then the shim's; {n} "
        f"batches per run in epochs of {epoch}; best/median/spread are per batch over the "
        f"chunks of {chunk} batches after the first (warm-up). Each chunk ends with one "
        "sync on the statistics, then gc.collect() and a read of VmRSS (not timed). "
        "'compiles' counts every XLA compilation of the run, eager ops included. "
        "'live arrays growth' is the change of len(jax.live_arrays()) over the same span: "
        "device buffers kept per batch show there even where the allocator hides them from "
        "the RSS by reusing pages freed earlier."
    )
    return data


def _combos(data: dict[str, Any], n: int, chunk: int, epoch: int) -> list[tuple[str, float]]:
    """Runs every combination through each contender; adds rows and targets to ``data``."""
    checks = []
    for nonfinite, accumulate in COMBOS:
        group = f"nonfinite={nonfinite!r}, accumulate={accumulate}"
        pool = loops.make_pool(
            pipeline.TINY_MAPS, seed=100, nan_every=loops.POOL if nonfinite == "omit" else 0
        )
        want = _expected(pool, accumulate)
        for name, driver in _drivers(nonfinite, accumulate, pool).items():
            out = _run(driver, n, chunk, epoch)
            growth = (out["rss"][-1] - out["rss"][0]) / MIB
            checks.append(
                (
                    f"{group} {name}",
                    max(abs(a - b) for a, b in zip(out["stats"], want, strict=True)),
                )
            )
            if nonfinite == "omit":
                data["notes"].append(
                    f"{group}, {name}: num_nonfinite at the end {driver.hook.num_nonfinite}"
                )
            live = out["live"][-1] - out["live"][0]
            data["rows"].append(
                {
                    "group": group,
                    "name": name,
                    "number": chunk,
                    "samples": out["times"],
                    "extra": {
                        "compiles": out["compiles"],
                        "compiles after warm-up": out["compiles_after_warmup"],
                        "RSS after warm-up": f"{out['rss'][0] / MIB:.0f} MiB",
                        "RSS growth": f"{growth:+.1f} MiB",
                        "live arrays growth": live,
                    },
                }
            )
            span = f"from batch {chunk} to {n}"
            data["targets"] += [
                {
                    "label": f"load {group}, {name}: RSS growth {span}",
                    "value": growth,
                    "op": "<=",
                    "bound": RSS_BOUND_MIB,
                    "unit": " MiB",
                },
                {
                    "label": f"load {group}, {name}: live jax arrays growth {span}",
                    "value": float(live),
                    "op": "<=",
                    "bound": 0.0,
                    "unit": " arrays",
                },
            ]
    return checks


if __name__ == "__main__":
    print(json.dumps(measure(quick="--quick" in sys.argv[1:])))
