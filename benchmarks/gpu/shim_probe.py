"""Per-batch cost of the Lightning shim against anomalib 0.7's callback, interleaved.

A quick probe (under a minute on CPU, seconds on a GPU): test and validation batches of 32
scores plus (32, 1, S, S) maps, fresh tensors every batch (no identity a cache could key on),
through ``torch_compat.MinMaxNormalizationCallback`` and the anomalib 0.7 stand-in of
``benchmarks.anomalib_ref``, timed in interleaved rounds, loops of ``--batches`` batches with
one sync at the end. Prints microseconds per batch (best and median of the rounds) and the
ratio. On a GPU (jax with CUDA and torch with CUDA) the tensors live on ``cuda``.

  PYTHONPATH=$PWD python benchmarks/gpu/shim_probe.py [--size 8] [--batches 200]
      [--rounds 15] [--profile test|validation] [--parts] [--evict MB]

``--parts`` also times the steps of the shim's steady test path alone, per batch, on the
same fresh tensors: the imports (one stream ordering), the jitted call, the exports, and
jax's own ``from_dlpack`` and torch's ``from_dlpack`` for comparison.

``--evict MB`` writes MB megabytes of a torch buffer before every batch of every contender,
as a model's forward pass does in a real loop, and times that write alone too (subtract it).
On a CPU this evicts the caches between batches: each contender then pays for the code and
data it touches per batch, which a tight loop hides.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import jax
import torch

from benchmarks import anomalib_ref


def _device() -> str:
    gpu = jax.devices()[0].platform == "gpu"
    return "cuda" if gpu and torch.cuda.is_available() else "cpu"


def _module(dev: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        image_threshold=types.SimpleNamespace(value=torch.tensor(1.2, device=dev)),
        pixel_threshold=types.SimpleNamespace(value=torch.tensor(0.9, device=dev)),
        image_metrics=None,
        pixel_metrics=None,
    )


def _batches(n: int, size: int, dev: str, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=dev).manual_seed(seed)  # made where they are used, as a model's
    return [
        {
            "pred_scores": torch.rand(32, generator=g, device=dev) * 3,
            "anomaly_maps": torch.rand(32, 1, size, size, generator=g, device=dev) * 3,
        }
        for _ in range(n)
    ]


def _evictor(mb: float, dev: str):
    """What runs before each batch: a write of ``mb`` MiB (nothing when ``mb`` is 0)."""
    if not mb:
        return lambda: None
    buf = torch.zeros(int(mb * 2**18), device=dev)
    return lambda: buf.add_(1.0)


def _sync(dev: str, out) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()
    else:
        for v in out.values():
            if isinstance(v, torch.Tensor):
                v.sum()  # a CPU tensor over a jax buffer is ready once read


def _parts(shim, fresh, dev) -> dict:
    """Loops over the steps of the steady test path (the plan the shim settled)."""
    import jax.dlpack

    from torch_compat import _dlpack, _steady

    plan = shim.plan
    if plan is None:
        print("no plan settled: the shim takes its full path for these batches")
        return {}
    device = plan.device
    tensors = [[b[k] for k in plan.keys] for b in fresh]
    if plan.gather is not None:  # on an accelerator the values travel with each batch
        tensors = [[*ts, _steady.gathered(plan.gather)] for ts in tensors]
    imported = [_dlpack.import_batch(ts, device) for ts in tensors]
    calls = [
        (plan.params, arrays) if plan.gather is None else (arrays[-1], arrays[:-1])
        for arrays in imported
    ]
    results = [plan.fn(params, *arrays) for params, arrays in calls]
    jax.block_until_ready(results)

    def loop(step):
        def run():
            out = None
            for i in range(len(fresh)):
                out = step(i)
            return (
                {"out": out[0]}
                if isinstance(out, list) and isinstance(out[0], torch.Tensor)
                else {}
            )

        return run

    return {
        "part: import_batch": loop(lambda i: _dlpack.import_batch(tensors[i], device)),
        "part: jax.dlpack.from_dlpack each": loop(
            lambda i: [jax.dlpack.from_dlpack(t) for t in tensors[i]]
        ),
        "part: jitted call, fresh imports": loop(lambda i: plan.fn(calls[i][0], *calls[i][1])),
        "part: export_batch": loop(lambda i: _dlpack.export_batch(results[i], device)),
        "part: torch.from_dlpack each": loop(lambda i: [torch.from_dlpack(a) for a in results[i]]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--profile", choices=["test", "validation"], default=None)
    p.add_argument("--parts", action="store_true")
    p.add_argument("--evict", type=float, default=0.0, metavar="MB")
    args = p.parse_args()
    from torch_compat import MinMaxNormalizationCallback

    dev = _device()
    n = args.batches
    val = _batches(4, args.size, dev, 0)
    fresh = _batches(n, args.size, dev, 1)  # fresh tensor objects, one set per batch

    evict = _evictor(args.evict, dev)
    shim, spm = MinMaxNormalizationCallback(), _module(dev)
    shim.setup(None, spm, "fit")
    ref, rpm = anomalib_ref.MinMaxNormalizationCallback(), _module(dev)

    def shim_val():
        shim.on_validation_epoch_start(None, spm)
        for i, b in enumerate(fresh):
            evict()
            shim.on_validation_batch_end(None, spm, dict(b), None, i, 0)
        shim.on_validation_epoch_end(None, spm)
        return {}

    def ref_val():
        rpm.normalization_metrics = anomalib_ref.MinMax().to(dev)
        for i, b in enumerate(fresh):
            evict()
            ref.on_validation_batch_end(None, rpm, dict(b), None, i, 0)
        return {"min": rpm.normalization_metrics.min}

    def test_loop(cb, pm):
        def run():
            out = None
            for i, b in enumerate(fresh):
                evict()
                out = dict(b)
                cb.on_test_batch_end(None, pm, out, None, i, 0)
            return out

        return run

    # Fit both on the same validation batches, then check they agree.
    shim.on_validation_epoch_start(None, spm)
    rpm.normalization_metrics = anomalib_ref.MinMax().to(dev)
    for i, b in enumerate(val):
        shim.on_validation_batch_end(None, spm, dict(b), None, i, 0)
        ref.on_validation_batch_end(None, rpm, dict(b), None, i, 0)
    shim.on_validation_epoch_end(None, spm)
    shim.on_test_start(None, spm)
    a, b = dict(fresh[0]), dict(fresh[0])
    shim.on_test_batch_end(None, spm, a, None, 0, 0)
    ref.on_test_batch_end(None, rpm, b, None, 0, 0)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(
        f"device {dev}, maps (32, 1, {args.size}, {args.size}), {n} fresh batches; "
        f"max |shim - anomalib| = {diff:.2g}"
    )

    contenders = {
        "shim test": test_loop(shim, spm),
        "anomalib test": test_loop(ref, rpm),
        "shim validation": shim_val,
        "anomalib validation": ref_val,
    }
    if args.evict:

        def evict_alone():
            for _ in fresh:
                evict()
            return {}

        contenders["eviction alone"] = evict_alone
    if args.profile:
        import cProfile
        import pstats

        fn = contenders[f"shim {args.profile}"]
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    if args.parts:
        contenders.update(_parts(shim, fresh, dev))

    times = {k: [] for k in contenders}
    for fn in contenders.values():
        _sync(dev, fn())  # warm: compiles
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter_ns()
            _sync(dev, fn())
            times[name].append((time.perf_counter_ns() - t0) / n / 1e3)
    for name, ts in times.items():
        print(f"{name:22s} best {min(ts):7.1f} us/batch  median {statistics.median(ts):7.1f}")
    if args.parts:
        return
    base = min(times["eviction alone"]) if args.evict else 0.0
    for phase in ("test", "validation"):
        s = [t - base for t in times[f"shim {phase}"]]
        r = [t - base for t in times[f"anomalib {phase}"]]
        print(
            f"{phase}: shim / anomalib = {min(s) / min(r):.2f} (best), "
            f"{statistics.median(s) / statistics.median(r):.2f} (median)"
        )


if __name__ == "__main__":
    main()
