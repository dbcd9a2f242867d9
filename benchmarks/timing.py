"""Timing that holds up on a noisy, shared machine.

Two rules drive the design:

* Contenders of one case are timed side by side: each round runs one block of consecutive
  calls of every contender, in a rotated order, so that a burst of load from another process
  hits all of them alike instead of one. Ratios are then taken between blocks of the same run.
* A block is long enough (``block_s``) that timer resolution and per-call jitter vanish, and
  every call is synchronised (``jax.block_until_ready``, ``torch.cuda.synchronize``) so that
  async dispatch cannot hide work.

The best block is the cleanest estimate of the intrinsic cost; the median is what a user
sees on a busy machine. Both are reported, with the relative spread of the blocks.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

try:
    import resource
except ImportError:  # not on Windows: page faults are then not counted
    resource = None
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def sync_jax(out: Any) -> None:
    """Waits for every jax array in ``out`` (a pytree) to be computed."""
    jax.block_until_ready(out)


def no_sync(out: Any) -> None:
    """For host-synchronous work: numpy, and torch on CPU."""
    del out


def sync_torch_cuda(out: Any) -> None:
    """Waits for the CUDA stream; torch kernels are asynchronous on GPU."""
    del out
    import torch

    torch.cuda.synchronize()


def sync_all(out: Any) -> None:
    """For contenders that mix jax and torch outputs (the Lightning shim)."""
    sync_jax(out)
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way of doing a case's work.

    Attributes:
      name: the label in tables.
      fn: does the work once and returns its outputs; takes no arguments so that input
        preparation stays outside the timed region.
      sync: waits until ``fn``'s outputs are really computed.
      role: ``"jaxnorm"``, ``"baseline"`` or ``"roofline"``; tables are read against it.
    """

    name: str
    fn: Callable[[], Any]
    sync: Callable[[Any], None] = sync_jax
    role: str = "baseline"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call seconds of one contender, one sample per timed block.

    Attributes:
      number: calls per block.
      samples: seconds per call, one entry per block, in the order they ran.
      faults_per_call: minor page faults per call over the timed blocks. Fresh pages cost
        the kernel a fault and zeroing each; where outputs are allocated anew every call
        (glibc mmaps blocks of 32 MiB and more), faults, not bandwidth, bound the time.
    """

    number: int
    samples: tuple[float, ...]
    faults_per_call: float | None = None

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range of the blocks over their median (0.05 = 5 %)."""
        q25, q75 = np.percentile(self.samples, [25, 75])
        return float((q75 - q25) / self.median) if self.median > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class TimerConfig:
    """How long to time.

    Attributes:
      rounds: blocks per contender; each round runs one block of every contender.
      block_s: target wall time of one block; the number of calls per block is chosen from it.
      warmup_s: minimum time spent calling each contender before calibration (after the
        calls that compile).
      max_number: cap on calls per block.
      warmup_calls: minimum calls before calibration, the two that compile included. Loops
        of hundreds of batches are warm after one call: they take 1.
    """

    rounds: int = 15
    block_s: float = 0.05
    warmup_s: float = 0.05
    max_number: int = 10_000
    warmup_calls: int = 5


def _call(c: Contender) -> float:
    t0 = time.perf_counter()
    c.sync(c.fn())
    return time.perf_counter() - t0


def _warm_up(c: Contender, warmup_s: float, calls: int) -> float:
    """Runs ``c`` until caches and compilations settle; returns a per-call estimate."""
    # The first two calls compile, allocate and fill caches; they count in no estimate
    # unless they are all there is.
    times: list[float] = []
    while len(times) < calls or (len(times) > 2 and sum(times[2:]) < warmup_s):
        times.append(_call(c))
    return statistics.median(times[2:] or times[-1:])


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _block(c: Contender, number: int) -> tuple[float, int]:
    """Seconds per call over ``number`` consecutive calls, and the page faults they took."""
    fn, sync = c.fn, c.sync
    f0 = _minor_faults()
    t0 = time.perf_counter()
    for _ in range(number):
        sync(fn())
    dt = time.perf_counter() - t0
    return dt / number, _minor_faults() - f0


def compare(contenders: Sequence[Contender], config: TimerConfig) -> dict[str, Timing]:
    """Times ``contenders`` against each other in alternating blocks.

    Args:
      contenders: the ways of doing one case's work, with distinct names.
      config: rounds and block length.

    Returns:
      The timing of each contender, by name.
    """
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be distinct, got {names}")
    numbers = {}
    for c in contenders:
        per_call = _warm_up(c, config.warmup_s, config.warmup_calls)
        numbers[c.name] = int(
            np.clip(round(config.block_s / max(per_call, 1e-9)), 1, config.max_number)
        )
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    faults = dict.fromkeys(names, 0)
    # Rotating the order puts every contender in every position equally often, so that a
    # cache warmed (or trashed) by the previous block favours none of them.
    order = list(contenders)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(config.rounds):
            k = r % len(order)
            for c in order[k:] + order[:k]:
                per_call, block_faults = _block(c, numbers[c.name])
                samples[c.name].append(per_call)
                faults[c.name] += block_faults
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        n: Timing(
            number=numbers[n],
            samples=tuple(samples[n]),
            faults_per_call=faults[n] / (numbers[n] * config.rounds) if resource else None,
        )
        for n in names
    }


def per_item(t: Timing, items: int) -> Timing:
    """``t`` divided by the ``items`` (batches, steps) that each timed call went through."""
    return dataclasses.replace(
        t,
        samples=tuple(s / items for s in t.samples),
        faults_per_call=None if t.faults_per_call is None else t.faults_per_call / items,
    )


@dataclasses.dataclass(frozen=True)
class CompileTime:
    """What a fresh ``jax.jit`` costs before its first result.

    Attributes:
      lower_s: tracing and lowering to StableHLO.
      compile_s: XLA compilation of the lowered module.
      first_call_s: trace + lower + compile + run of the first call of another fresh jit, the
        latency a user sees on a new input shape.
    """

    lower_s: float
    compile_s: float
    first_call_s: float


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    # A new function object: jax caches traces, lowerings and executables per function, so
    # re-jitting ``fn`` itself could return cached work instead of compiling.
    def fresh(*args: Any) -> Any:
        return fn(*args)

    return fresh


def measure_compile(fn: Callable[..., Any], *args: Any) -> CompileTime:
    """Measures lowering, compilation and first-call time of ``jax.jit(fn)`` on ``args``.

    Functions that ``fn`` calls and that are themselves jitted have their trace cached after
    the first measurement, but the XLA compilation of the new outer module is always fresh.
    """
    jitted = jax.jit(_fresh(fn))
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    first = jax.jit(_fresh(fn))
    t3 = time.perf_counter()
    jax.block_until_ready(first(*args))
    t4 = time.perf_counter()
    return CompileTime(lower_s=t1 - t0, compile_s=t2 - t1, first_call_s=t4 - t3)
