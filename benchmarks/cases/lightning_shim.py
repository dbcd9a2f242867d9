"""Case ``shim``: the Lightning callback per test batch, against anomalib 0.7's eager callback.

The shim pays for two DLPack exchanges per tensor on top of ``jaxnorm.normalize``; the DLPack
rows time those exchanges alone, so the shim's overhead can be read off the table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.dlpack
import torch

from benchmarks import environment, timing
from benchmarks import labels as L
from benchmarks.cases import base, loops
from benchmarks.records import CaseResult, timed_rows
from torch_compat import to_jax, to_torch

KEY = "shim"
TITLE = "Lightning callback per test batch: torch_compat vs anomalib 0.7, and DLPack alone"

SHIM = L.SHIM_TEST_BATCH
ANOMALIB = L.ANOMALIB_NORMALIZE_BATCH
TO_JAX = "torch -> jax: jax.dlpack.from_dlpack(t)"
TO_TORCH = "jax -> torch: torch.from_dlpack(a)"
SHIM_TO_JAX = "torch -> jax: torch_compat.to_jax(t)"
SHIM_TO_TORCH = "jax -> torch: torch_compat.to_torch(a, like=t)"

VAL_BATCHES = 3


def _batch(seed: int, with_maps: bool) -> dict[str, torch.Tensor]:
    out = {"pred_scores": base.to_torch(base.raw_scores(base.SCORES, seed=seed))}
    if with_maps:
        out["anomaly_maps"] = base.to_torch(base.raw_scores(base.MAPS_256, seed=seed + 100))
    return out


def _test_batch(cb: Any, pm: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    # The hook rewrites its dict in place: each call gets a fresh dict of the same tensors.
    outputs = dict(batch)
    cb.on_test_batch_end(None, pm, outputs, None, 0, 0)
    return outputs


def _dlpack_rows(res: CaseResult, cfg: base.RunConfig) -> None:
    for shape in (base.MAPS_256, base.SCORES):
        group = f"DLPack {L.array_group(shape, 'float32')}"
        t = base.to_torch(base.raw_scores(shape))
        a = base.to_jax(base.raw_scores(shape))
        contenders = [
            timing.Contender(TO_JAX, lambda t=t: jax.dlpack.from_dlpack(t.detach().contiguous())),
            timing.Contender(TO_TORCH, lambda a=a: torch.from_dlpack(a), sync=timing.sync_all),
            timing.Contender(SHIM_TO_JAX, lambda t=t: to_jax(t)),
            timing.Contender(SHIM_TO_TORCH, lambda a=a, t=t: to_torch(a, t), sync=timing.sync_all),
        ]
        timings = timing.compare(contenders, cfg.timer)
        res.rows += timed_rows(group, contenders, timings)
        if shape == base.MAPS_256 and environment.torch_device() == "cpu":
            back = torch.from_dlpack(a)
            there = jax.dlpack.from_dlpack(t)
            copies = [
                name
                for name, same in (
                    (TO_JAX, there.unsafe_buffer_pointer() == t.data_ptr()),
                    (TO_TORCH, back.data_ptr() == a.unsafe_buffer_pointer()),
                )
                if not same
            ]
            res.notes.append(
                f"DLPack {shape}: "
                + (f"copies in {copies}" if copies else "zero-copy both ways (data pointers equal)")
            )


def run(cfg: base.RunConfig) -> CaseResult:
    """Times one test batch through each callback, and the DLPack exchanges alone."""
    res = CaseResult(key=KEY, title=TITLE)
    _dlpack_rows(res, cfg)
    for with_maps in (True, False):
        group = L.SHIM_MAPS_GROUP if with_maps else "32 scores only"
        val = [_batch(seed=10 + i, with_maps=with_maps) for i in range(VAL_BATCHES)]
        test = _batch(seed=0, with_maps=with_maps)
        shim, shim_pm = loops.fitted_shim(val)
        ref, ref_pm = loops.fitted_anomalib(val)
        diff = loops.max_diff(_test_batch(shim, shim_pm, test), _test_batch(ref, ref_pm, test))
        res.notes.append(f"{group}: max |shim - anomalib| = {diff:.2g}")
        contenders = [
            timing.Contender(
                SHIM,
                lambda cb=shim, pm=shim_pm, b=test: _test_batch(cb, pm, b),
                sync=timing.sync_all,
                role="jaxnorm",
            ),
            timing.Contender(
                ANOMALIB,
                lambda cb=ref, pm=ref_pm, b=test: _test_batch(cb, pm, b),
                sync=base.torch_sync(),
            ),
        ]
        timings = timing.compare(contenders, cfg.timer)
        res.rows += timed_rows(group, contenders, timings)
        if with_maps:
            res.add_ratio_target(
                f"shim, {group}: anomalib time / shim time", group, ANOMALIB, SHIM, ">=", 4.0
            )
        else:
            res.add_ratio_target(
                f"shim, {group}: shim time / anomalib time", group, SHIM, ANOMALIB, "<=", 2.0
            )
    # Sanity: the shim must hand back torch tensors, as anomalib's callback does.
    kinds = {type(v).__name__ for v in _test_batch(shim, shim_pm, test).values()}
    res.notes.append(f"shim output types: {sorted(kinds)}")
    return res
