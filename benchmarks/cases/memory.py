"""Case ``memory``: peak memory of normalizing one 256 MiB array, one fresh process per contender.

A high-water mark is per process and never goes down, so each contender runs alone in a
subprocess (``python -m benchmarks.cases.memory <contender>``). There the input is allocated
and the function run once (compilation and allocator warm-up), the output dropped, the
high-water mark reset to the current RSS (``/proc/self/clear_refs``) and the function run
again: the rise of the mark is what the call needs beyond its input. On GPU the backends'
own counters (``memory_stats()``, ``torch.cuda.max_memory_allocated``) are used instead.
"""

from __future__ import annotations

import gc
import json
import pathlib
import resource
import subprocess
import sys
from typing import Any

import numpy as np

from benchmarks import labels as L
from benchmarks.records import CaseResult, Row, Target

KEY = "memory"
TITLE = "peak memory of normalizing one (64, 1, 1024, 1024) float32 array (256 MiB)"

SHAPE = (64, 1, 1024, 1024)
# Quick runs are smoke tests: a quarter of the size halves the probes' page-fault time.
QUICK_SHAPE = (16, 1, 1024, 1024)
MIB = 2**20
JAXNORM = L.NORMALIZE
TORCH = L.ANOMALIB_NORMALIZE
ROOFLINE = "roofline: jit(x * s)"
CONTENDERS = {"jaxnorm": JAXNORM, "torch": TORCH, "roofline": ROOFLINE}

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets the RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _host_probe(fn: Any, x: Any, sync: Any) -> dict[str, Any]:
    sync(fn(x))  # compiles, and lets the allocator reach its steady state
    gc.collect()
    reset = _reset_peak()
    base_kib = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn(x)
    sync(out)
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "extra_bytes": (peak_kib - base_kib) * 1024,
        "out_bytes": _nbytes(out),
        "method": "VmHWM after clear_refs" if reset else "ru_maxrss (not reset; upper bound)",
    }


def _nbytes(a: Any) -> int:
    return int(a.nbytes) if hasattr(a, "nbytes") else int(a.numel() * a.element_size())


def probe(contender: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Runs in the subprocess: the memory one call of ``contender`` needs beyond its input."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    x_np = np.random.default_rng(0).random(shape, dtype=np.float32) * 5
    if contender == "torch":
        import torch

        from benchmarks import anomalib_ref, environment

        tdev = environment.torch_device()
        x = torch.from_numpy(x_np).to(tdev)
        del x_np
        args = [torch.tensor(v, device=tdev) for v in (1.0, 0.0, 5.0)]

        def fn(x):
            return anomalib_ref.normalize(x, *args)

        if tdev == "cuda":
            fn(x)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn(x)
            torch.cuda.synchronize()
            return {
                "extra_bytes": torch.cuda.max_memory_allocated() - before,
                "out_bytes": _nbytes(out),
                "method": "torch.cuda.max_memory_allocated",
            }
        return _host_probe(fn, x, lambda out: None)

    import jaxnorm

    # Copied into a jax buffer (not aliased) so that freeing the numpy array frees its pages.
    x = jax.block_until_ready(jnp.array(x_np, copy=True))
    del x_np
    s = jnp.float32(1.0)
    roofline = jax.jit(lambda x, s: x * s)
    if contender == "jaxnorm":

        def fn(x):
            return jaxnorm.normalize(x, 1.0, 0.0, 5.0)
    else:

        def fn(x):
            return roofline(x, s)

    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        jax.block_until_ready(fn(x))
        before = dev.memory_stats()["bytes_in_use"]
        out = jax.block_until_ready(fn(x))
        # The peak never resets; it is at least input + output here, so a rise is real.
        peak = dev.memory_stats()["peak_bytes_in_use"]
        return {
            "extra_bytes": peak - before,
            "out_bytes": _nbytes(out),
            "method": "device memory_stats peak_bytes_in_use",
        }
    return _host_probe(fn, x, jax.block_until_ready)


def run(cfg: Any) -> CaseResult:
    """Runs one subprocess per contender and compares their peaks with input + output."""
    res = CaseResult(
        key=KEY,
        title=TITLE,
        columns=["peak over input", "x output size", "input+peak / (input+output)"],
    )
    shape = QUICK_SHAPE if cfg.quick else SHAPE
    in_bytes = 4 * int(np.prod(shape))
    group = f"{shape} float32"
    # Each probe pays a fresh interpreter's imports; quick runs skip the roofline's. The
    # probes run at once: a high-water mark is per process, and most of their time is imports.
    keys = ["jaxnorm", "torch"] if cfg.quick else list(CONTENDERS)
    arg = ",".join(map(str, shape))
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cases.memory", key, arg],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key in keys
    }
    for key, proc in procs.items():
        name = CONTENDERS[key]
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {key} failed:\n{stderr[-2000:]}")
        data = json.loads(stdout.strip().splitlines()[-1])
        extra, out = data["extra_bytes"], data["out_bytes"]
        footprint = (in_bytes + extra) / (in_bytes + out)
        res.rows.append(
            Row(
                group=group,
                name=name,
                role="jaxnorm" if key == "jaxnorm" else "baseline",
                extra={
                    "peak over input": f"{extra / MIB:.0f} MiB",
                    "x output size": f"{extra / out:.2f}x",
                    "input+peak / (input+output)": f"{footprint:.2f}x",
                },
            )
        )
        if key == "jaxnorm":
            res.targets.append(
                Target(
                    f"memory {group}: jaxnorm (input + peak) / (input + output)",
                    footprint,
                    "<=",
                    1.1,
                )
            )
        method = data["method"]
    res.notes.append(
        f"Measured with {method}, one fresh process per contender, on the second "
        "call (the first compiles and warms the allocator)."
    )
    return res


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], tuple(int(d) for d in sys.argv[2].split(",")))))
