"""Case ``loop``: a real Lightning loop, ``Trainer.validate`` then ``Trainer.test``, per callback.

A small conv feature model (a ResNet-18 stem, conv1 to layer2, in plain torch) turns each
batch of images into anomalib-style outputs: ``anomaly_maps`` (B x 1 x H x W, the features'
energy upsampled to the image size) and ``pred_scores`` (the maps' max). The model runs on
every batch, so every batch's outputs are fresh tensors. The module carries anomalib's
``image_threshold`` / ``pixel_threshold`` objects (a ``value`` tensor that moves with the
module), so both callbacks read what they read in anomalib.

Three runs of the same loop: no callback, anomalib 0.7's callback (``benchmarks.anomalib_ref``
in a Lightning ``Callback``) and ``torch_compat``'s shim, each with its own ``Trainer``, the
three interleaved round by round; each run is synced at its end. Each is timed at two batch
counts, ``n1`` and ``n2 = 4 n1``, so that a callback's cost splits into a cost per batch,
``(t(n2) - t(n1)) / (n2 - n1)``, and a cost per run (setup, first reads, compiles that
repeat), ``t(n1) - n1 * per batch``; the table shows both, and what each callback adds to the
run without one. Figures come from the best run of each kind (and the median beside). As a
check that needs no subtraction of noisy runs, the time between consecutive batch ends inside
the runs is shown too (its median is robust to a burst of load that spoils a whole run).

On a GPU the images are 32 x 3 x 256 x 256 and the stem has ResNet-18's widths. On CPU the
images are 32 x 3 x 8 x 8 and the stem a quarter as wide: the outputs are then 32 scores and
(32, 1, 8, 8) maps, the tiny sizes where a batch's cost is host work, and the CPU goal for
them is judged in a real loop; torch runs on one thread there.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import time
import types
from typing import Any

import numpy as np
import torch

from benchmarks import environment, timing
from benchmarks import labels as L
from benchmarks.cases import base, loop_model, loops
from benchmarks.records import CaseResult, Row
from benchmarks.report import fmt_time

KEY = "loop"
TITLE = (
    "a real Lightning loop (Trainer.validate, then Trainer.test) on a conv feature model: "
    "cost per batch and per run of each callback"
)

NONE, ANOMALIB, SHIM = L.NO_CALLBACK, L.ANOMALIB_CALLBACK, L.SHIM
CALLBACKS = (NONE, ANOMALIB, SHIM)
PHASES = ("validate", "test")
PER_BATCH, EXTRA_BATCH = "per batch", "+ per batch"
PER_RUN, EXTRA_RUN = "per run", "+ per run"
COLUMNS = [PER_BATCH, EXTRA_BATCH, PER_RUN, EXTRA_RUN]
PER_RUN_BOUND_MS = 50.0
# Distinct input batches cycled through a loop; every loop runs at least this many batches, so
# the statistics anomalib accumulates over runs equal those the shim collects in each.
POOL = 4


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One platform's loop: images per batch, their side, the stem's width, batch counts."""

    batch: int
    side: int
    width: int
    n1: int
    rounds: int

    @property
    def n2(self) -> int:
        return 4 * self.n1


def sizes(cfg: base.RunConfig) -> Sizes:
    """A real model's batch on a GPU; tiny outputs on CPU, where host work is all it costs."""
    if environment.torch_device() == "cuda":
        return Sizes(
            batch=32, side=256, width=64, n1=5 if cfg.quick else 15, rounds=2 if cfg.quick else 5
        )
    return Sizes(
        batch=32, side=8, width=16, n1=POOL if cfg.quick else 25, rounds=2 if cfg.quick else 9
    )


@dataclasses.dataclass
class Run:
    """One callback's Trainer and model."""

    trainer: Any
    model: Any
    last: Any

    def phase(self, phase: str, n: int) -> tuple[float, list[float]]:
        """One ``Trainer.validate`` or ``Trainer.test`` of ``n`` batches, synced at its end.

        Returns:
          Its seconds, and the seconds between consecutive batch ends after the first two
          batches (each spans one whole batch: loading, step and every callback).
        """
        fn = self.trainer.validate if phase == "validate" else self.trainer.test
        self.last.stamps.clear()
        # A collection inside one run and not another would be timed as noise. (No
        # gc.collect() before: with jax, torch and Lightning loaded, one takes ~0.4 s.)
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn(self.model, dataloaders=loop_model.loader(n), verbose=False)
            timing.sync_all(self.last.outputs)
            dt = time.perf_counter() - t0
        finally:
            gc.enable()
        return dt, np.diff(self.last.stamps[1:]).tolist()


def _make_runs(ns: types.SimpleNamespace, sz: Sizes) -> dict[str, Run]:
    dev = environment.torch_device()
    gen = torch.Generator().manual_seed(0)
    images = {
        phase: [
            torch.rand(sz.batch, 3, sz.side, sz.side, generator=gen).to(dev) for _ in range(POOL)
        ]
        for phase in PHASES
    }
    with torch.random.fork_rng(devices=[]):  # the module's init must not move the user's seed
        torch.manual_seed(0)
        model = ns.Module(sz.width, images).eval()
    # Thresholds inside the range of the validation maps, so that normalized outputs are not
    # all clipped to 0 or 1 and the callbacks' agreement means something.
    with torch.inference_mode():
        maps = torch.cat([model.to(dev)(x)["anomaly_maps"].cpu() for x in images["validate"]])
    mid = float((maps.min() + maps.max()) / 2)
    model.image_threshold.value.fill_(mid)
    model.pixel_threshold.value.fill_(mid)
    model.images = {}  # each copy below gets the same pool, not a copy of it
    accelerator = "gpu" if dev == "cuda" else "cpu"
    runs = {}
    for name in CALLBACKS:
        last = ns.Last()
        callback = ns.callbacks[name]()
        trainer = ns.pl.Trainer(
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[c for c in (callback, last) if c is not None],
        )
        copied = copy.deepcopy(model)
        copied.images = images
        runs[name] = Run(trainer=trainer, model=copied, last=last)
    return runs


def _stats(model: Any) -> tuple[float, float]:
    metrics = model.normalization_metrics
    return float(metrics.min), float(metrics.max)


@dataclasses.dataclass
class Measured:
    """What the interleaved runs measured.

    Attributes:
      runs: seconds of each run, by (callback, phase, batches).
      intervals: seconds between consecutive batch ends inside the runs, by (callback, phase).
      first: seconds of each callback's first, cold validate + test.
    """

    runs: dict[tuple[str, str, int], list[float]] = dataclasses.field(default_factory=dict)
    intervals: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)
    first: dict[str, float] = dataclasses.field(default_factory=dict)


def _time_runs(runs: dict[str, Run], sz: Sizes) -> Measured:
    """Interleaved rounds: every callback, both phases, both batch counts, in rotated order."""
    m = Measured()
    order = list(CALLBACKS)
    for name in order:  # a first, cold pass: compiles, caches; reported, never in a best
        m.first[name] = sum(runs[name].phase(phase, sz.n1)[0] for phase in PHASES)
    for r in range(sz.rounds):
        k = r % len(order)
        counts = (sz.n1, sz.n2) if r % 2 == 0 else (sz.n2, sz.n1)
        for name in order[k:] + order[:k]:
            for n in counts:
                for phase in PHASES:  # test after validate: its statistics come from there
                    dt, intervals = runs[name].phase(phase, n)
                    m.runs.setdefault((name, phase, n), []).append(dt)
                    m.intervals.setdefault((name, phase), []).extend(intervals)
    return m


def _split(m: Measured, sz: Sizes, phase: str, name: str) -> dict[str, tuple[float, float]]:
    """(per batch, per run) of ``name`` from the runs of ``n1`` and ``n2`` batches.

    From the best runs and from the median runs, as ``"best"`` and ``"median"``.
    """
    out = {}
    for stat, pick in (("best", min), ("median", statistics.median)):
        t1, t2 = pick(m.runs[name, phase, sz.n1]), pick(m.runs[name, phase, sz.n2])
        per_batch = (t2 - t1) / (sz.n2 - sz.n1)
        out[stat] = per_batch, t1 - sz.n1 * per_batch
    return out


def run(cfg: base.RunConfig) -> CaseResult:
    """Times validate and test loops of two lengths under each callback."""
    res = CaseResult(key=KEY, title=TITLE, columns=COLUMNS)
    try:
        ns = loop_model.namespace()
    except ImportError as e:
        res.skipped = f"no Lightning to run a Trainer ({e})"
        return res
    sz = sizes(cfg)
    threads = torch.get_num_threads()
    if environment.torch_device() == "cpu":
        # On a small shared CPU, an OpenMP pool of several threads spends tiny convs waiting
        # at its barriers, and that noise would swamp the callbacks' cost. One thread for
        # every run alike; the callbacks' torch ops on tiny tensors are single-threaded anyway.
        torch.set_num_threads(1)
    try:
        with loop_model.quiet():
            runs = _make_runs(ns, sz)
            measured = _time_runs(runs, sz)
            # Both callbacks saw the same batches: their statistics and last test outputs agree.
            for phase in PHASES:
                runs[ANOMALIB].phase(phase, sz.n1)
                runs[SHIM].phase(phase, sz.n1)
    finally:
        torch.set_num_threads(threads)
    stats = {name: _stats(runs[name].model) for name in (ANOMALIB, SHIM)}
    res.notes.append(
        loops.agree(
            "validate, (min, max) of the shim against anomalib's",
            {SHIM: max(abs(a - b) for a, b in zip(stats[SHIM], stats[ANOMALIB], strict=True))},
            tol=0.0,
        )
    )
    res.notes.append(
        loops.agree(
            "test, last batch of the shim against anomalib's",
            {SHIM: loops.max_diff(runs[SHIM].last.outputs, runs[ANOMALIB].last.outputs)},
        )
    )

    figures = {
        (phase, name): _split(measured, sz, phase, name) for phase in PHASES for name in CALLBACKS
    }
    label = f"{sz.batch} x 3 x {sz.side} x {sz.side} images"
    for phase in PHASES:
        for n in (sz.n1, sz.n2):
            group = f"{phase}, {n} batches of {label}, whole run"
            for name in CALLBACKS:
                res.rows.append(
                    Row(
                        group=group,
                        name=name,
                        role="jaxnorm" if name == SHIM else "baseline",
                        timing=timing.Timing(
                            number=1, samples=tuple(measured.runs[name, phase, n])
                        ),
                    )
                )
        group = f"{phase}: per batch and per run, from {sz.n1} and {sz.n2} batches (best runs)"
        for name in CALLBACKS:
            pb, pr = figures[phase, name]["best"]
            pb0, pr0 = figures[phase, NONE]["best"]
            extra = {PER_BATCH: base_fmt(pb), PER_RUN: base_fmt(pr)}
            if name != NONE:
                extra |= {EXTRA_BATCH: signed(pb - pb0), EXTRA_RUN: signed(pr - pr0)}
            res.rows.append(Row(group=group, name=name, role="baseline", extra=extra))
        group = f"{phase}: time per batch inside the runs, between consecutive batch ends"
        pb0 = float(np.median(measured.intervals[NONE, phase]))
        for name in CALLBACKS:
            intervals = measured.intervals[name, phase]
            res.rows.append(
                Row(
                    group=group,
                    name=name,
                    role="jaxnorm" if name == SHIM else "baseline",
                    timing=timing.Timing(number=1, samples=tuple(intervals)),
                    extra={} if name == NONE else {EXTRA_BATCH: signed(np.median(intervals) - pb0)},
                )
            )

    def ratio(phase: str) -> dict[str, float]:
        return {
            stat: figures[phase, SHIM][stat][0] / figures[phase, ANOMALIB][stat][0]
            for stat in ("best", "median")
        }

    def extra_run_ms(phase: str) -> dict[str, float]:
        return {
            stat: 1e3 * (figures[phase, SHIM][stat][1] - figures[phase, NONE][stat][1])
            for stat in ("best", "median")
        }

    def goal(label: str, values: dict[str, float], bound: float, unit: str, platform: str):
        res.add_target(
            label,
            values["best"],
            "<=",
            bound,
            median=values["median"],
            unit=unit,
            platform=platform,
        )

    for phase in PHASES:
        goal(
            f"GPU: loop, {phase}: shim time per batch / anomalib's (<= 1: the shim adds no "
            "more per batch than anomalib's callback)",
            ratio(phase),
            1.0,
            "x",
            "gpu",
        )
        goal(
            f"GPU: loop, {phase}: the shim's extra cost per run over no callback",
            extra_run_ms(phase),
            PER_RUN_BOUND_MS,
            " ms",
            "gpu",
        )
    goal(
        "CPU: loop at tiny sizes (32 scores + (32, 1, 8, 8) maps, fresh every batch), test: "
        "shim time per batch / anomalib's",
        ratio("test"),
        1.0,
        "x",
        "cpu",
    )

    res.notes.append(
        f"Each run is one `Trainer.validate` or `Trainer.test` of n batches ({sz.n1} and "
        f"{sz.n2}), synced at its end; {sz.rounds} interleaved rounds after a cold pass. The "
        f"model is a ResNet-18 stem (conv1 to layer2, width {sz.width} after conv1) on "
        f"{label} from a pool of {POOL} batches on {environment.torch_device()}, outputs "
        f"({sz.batch}, 1, {sz.side}, {sz.side}) maps and {sz.batch} scores, computed anew "
        "every batch. Per batch = (t(n2) - t(n1)) / (n2 - n1), per run = t(n1) - n1 x per "
        "batch, from the best runs; + columns are the extra over no callback. Times per "
        "batch of the whole loop, model and Lightning included: "
        + "; ".join(
            f"{phase} {name} {base_fmt(figures[phase, name]['best'][0])}"
            for phase in PHASES
            for name in CALLBACKS
        )
        + "."
    )
    res.notes.append(
        "Median runs: extra per batch "
        + "; ".join(
            f"{phase} {name} "
            + signed(figures[phase, name]["median"][0] - figures[phase, NONE]["median"][0])
            for phase in PHASES
            for name in (ANOMALIB, SHIM)
        )
        + "; extra per run "
        + "; ".join(
            f"{phase} {name} "
            + signed(figures[phase, name]["median"][1] - figures[phase, NONE]["median"][1])
            for phase in PHASES
            for name in (ANOMALIB, SHIM)
        )
        + "."
    )
    res.notes.append(
        f"First (cold) validate + test of {sz.n1} batches each: "
        + "; ".join(f"{name} {base_fmt(t)}" for name, t in measured.first.items())
        + " (the shim's first includes its jit compiles)."
    )
    return res


def base_fmt(seconds: float) -> str:
    """A duration, with its unit (negative ones too: differences of noisy times can be)."""
    return fmt_time(seconds) if seconds >= 0 else "-" + fmt_time(-seconds)


def signed(seconds: float) -> str:
    """A difference of durations, with its sign."""
    return ("+" if seconds >= 0 else "") + base_fmt(seconds)
