"""Checks of torch_compat's CUDA exchange that only a GPU can run (about a minute).

``torch_compat/_dlpack.py`` calls jaxlib's DLPack functions directly and orders torch's and
jax's streams itself, once per batch (see its module docstring). This probe checks, on a busy
GPU, each ordering the design relies on, and prints ``OK`` or ``FAIL`` per check:

0. the first-use check of the direct calls against the public ``jax.dlpack.from_dlpack`` /
   ``torch.from_dlpack`` (``torch_compat/_dlpack_check.py``) passes on this GPU;
1. import: torch writes a tensor on a non-default stream after a long spin; jax, reading it
   through ``import_batch`` with that stream, must see the write (no stale read), and the
   call must return before the spin ends (no host wait);
2. export: ``export_batch`` hands a jax result to torch's legacy default stream and to a side
   stream; torch's kernels on that stream must read the finished values;
3. a view with a storage offset (``t[1:]``) goes through ``to_jax`` and a jitted call
   without XLA's alignment error;
4. the external-ready-events streams jax hands out (round-robin per device) and the
   arity of jaxlib's import function found on this jaxlib.

Run from the repository root on a CUDA machine (``gpu_check.sh`` runs it):
  python benchmarks/gpu/cuda_exchange_probe.py
It exits with 1 when a check fails, 0 when all pass, 2 without a GPU.
"""

from __future__ import annotations

import sys
import time
import warnings

import jax
import jax.numpy as jnp
import torch

from torch_compat import _dlpack, _dlpack_check

SPIN = 200_000_000  # torch.cuda._sleep cycles: ~0.1 s on an H200


def main() -> int:
    if not torch.cuda.is_available() or not _dlpack.jax_reads_device(torch.device("cuda")):
        print("no CUDA device that both torch and jax see: nothing to check")
        return 2
    dev = torch.device("cuda", 0)
    print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__)
    # 0. the direct calls' first-use check against the public functions (_dlpack_check):
    # FAIL means they disagree on this GPU, and the exchange uses the public functions.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = _dlpack_check.fast_path_ok(dev)
    print(("OK" if checked else "FAIL") + " first-use check of the direct calls", end="")
    print("".join(f": {w.message}" for w in caught))
    _dlpack.to_jax(torch.ones(1 << 10, device=dev))  # finds jaxlib's arity
    jax_device, stream = _dlpack.jax_gpu(0)
    pool = {jax_device.get_stream_for_external_ready_events() for _ in range(8)}
    print(
        f"arity {_dlpack._fast_arities[0]}, batch path {_dlpack.batch_device_ok(dev)}, "
        f"kept stream {stream}, streams handed out {sorted(pool)}"
    )
    failures = 0 if checked else 1
    total = jax.jit(lambda a: a.sum())

    side = torch.cuda.Stream(device=dev)
    waited = []
    for trial in range(10):
        t = torch.zeros(1 << 22, device=dev)
        with torch.cuda.stream(side):
            torch.cuda._sleep(SPIN)
            t.fill_(1.0)
            start = time.perf_counter()
            (a,) = _dlpack.import_batch([t], dev, side)
            out = total(a)
            waited.append(time.perf_counter() - start)
        if float(out) != t.numel():
            print(f"FAIL import ordering: trial {trial} read {float(out)}, not {t.numel()}")
            failures += 1
            break
    else:
        print(
            f"OK import ordering (10 trials; import + dispatch {max(waited) * 1e3:.2f} ms "
            "at most, while the spin ran)"
        )

    double = jax.jit(lambda a: a * 2)
    for name, st in (("legacy default", torch.cuda.default_stream(dev)), ("side", side)):
        with torch.cuda.stream(st):
            x = jnp.ones(1 << 22)
            (out,) = _dlpack.export_batch([double(x)], dev, st)
            got = float(out.sum())
        if got != 2 * (1 << 22):
            print(f"FAIL export ordering on the {name} stream: sum {got}")
            failures += 1
        else:
            print(f"OK export ordering on the {name} stream")

    view = torch.arange(1025, dtype=torch.float32, device=dev)[1:]
    try:
        got = float(total(_dlpack.to_jax(view)))
        ok = got == float(view.sum())
        print(("OK" if ok else "FAIL") + f" misaligned view: sum {got}")
        failures += not ok
    except Exception as e:  # noqa: BLE001  the failure is what this check reports
        print(f"FAIL misaligned view: {type(e).__name__}: {str(e)[:300]}")
        failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
