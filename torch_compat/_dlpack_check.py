"""The first-use check of ``torch_compat._dlpack``'s direct DLPack calls, on each device.

``_dlpack`` crosses tensors through jaxlib's and torch's C functions
(``dlpack_managed_tensor_to_buffer``, ``buffer_to_dlpack_managed_tensor``,
``torch.utils.dlpack.to_dlpack``, ``torch._C._from_dlpack``), which skip jax's and torch's
own checks; on CUDA this code has never run in the project's CI. Before their first use on
each device, one small probe crosses both ways through them and through the public
``jax.dlpack.from_dlpack`` / ``torch.from_dlpack``: values, dtypes, shapes and devices must
agree, with no error. Otherwise the public functions are used on that device from then on
(the same results, with more host work per batch), with one ``FastPathWarning`` per process
that names the jax, jaxlib and torch versions.

A segfault inside a direct call cannot be caught here; every other failure (an exception, a
wrong value, dtype, shape or device) is.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import torch

from torch_compat import _dlpack


class FastPathWarning(UserWarning):
    """The direct DLPack calls failed their first-use check: the public functions are used."""


# Hit rule of ``_verdicts`` (one verdict per torch device, e.g. ``cpu``, ``cuda:1``): a
# verdict is about the code of this process's jaxlib and torch on that device, which cannot
# change while the process runs; it depends on no tensor or array value. A new process (a
# fork, a spawned DDP worker) inherits it from, or makes it again with, the same libraries.
_verdicts: dict[torch.device, bool] = {}
_warned = False
# The probe's values: exact in every dtype of the direct calls (and no NaN: equal is equal).
_PROBE = (-1.5, 0.0, 0.25, 3.0, 7.0)


def fast_path_ok(device: torch.device) -> bool:
    """Whether the direct DLPack calls may be used on ``device`` (checked once per device)."""
    verdict = _verdicts.get(device)
    if verdict is None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        verdict = _verdicts.get(device)
        if verdict is None:
            verdict = _verdicts[device] = _check(device)
    return verdict


def _check(device: torch.device) -> bool:
    """Crosses the probe both ways on ``device``; ``False`` (with the warning) when the direct
    calls fail or disagree with the public functions."""
    if (
        _dlpack.fast_from_dlpack is None  # this jaxlib has none (the floor's 0.6)
        or device.type not in ("cpu", "cuda")
        or not _dlpack.jax_reads_device(device)
    ):
        return False  # no direct calls there: the public functions, as designed
    if device.type == "cpu":
        jax_device, stream, dl_type = _dlpack.local_cpu(), None, _dlpack.KDL_CPU
    else:
        jax_device, stream = _dlpack.jax_gpu(device.index)
        dl_type = _dlpack._KDL_CUDA
        if jax_device is None:
            return False  # jax does not see this GPU: the public function explains
    try:
        problem = _probe(device, jax_device, stream, dl_type)
    except Exception as e:  # noqa: BLE001  any failure of a direct call is a verdict
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return True
    if _dlpack.fast_from_dlpack is None:
        return False  # no known signature fits: given up for good, as designed (no warning)
    _warn(device, problem)
    return False


def _probe(device, jax_device, stream, dl_type) -> str | None:
    """What differs between the direct and the public exchange on ``device``, or ``None``."""
    tensors, want = [], []
    for dtype in sorted(_dlpack._FAST_DTYPES, key=str):
        t = torch.tensor(_PROBE, device=device).to(dtype)
        try:
            want.append(jax.dlpack.from_dlpack(t))
        except Exception:  # noqa: BLE001  this torch cannot export it (bool before 2.2)
            continue  # not the direct calls' fault: both ways fail alike
        tensors.append(t)
    # Import: to_jax's call per tensor, then import_batch's (where the callback uses it).
    got = {
        "the direct import": [_dlpack.fast_call(t, jax_device, stream, dl_type) for t in tensors]
    }
    if _dlpack.fast_from_dlpack is None:
        return "jaxlib's direct import accepts none of the known signatures"  # (no warning)
    if device.type == "cpu" or stream is not None:
        got["import_batch"] = _dlpack.import_batch(tensors, device)
    for name, arrays in got.items():
        for t, w, a in zip(tensors, want, arrays, strict=True):
            if not (
                isinstance(a, jax.Array)
                and a.dtype == w.dtype
                and a.shape == w.shape
                and a.devices() == w.devices()
                and np.array_equal(np.asarray(a), np.asarray(w))
            ):
                return f"{name} of a {t.dtype} tensor gave {a!r}, the public import {w!r}"
    if _dlpack.fast_to_dlpack is None:
        return None  # export_batch is never used: to_torch's public export remains
    # Export: export_batch against torch.from_dlpack, of arrays jax placed itself.
    arrays, public = [], []
    for w in want:
        a = jax.device_put(np.asarray(w), jax_device)
        try:
            public.append(torch.from_dlpack(a))
        except Exception:  # noqa: BLE001  this torch cannot import it: as above
            continue
        arrays.append(a)
    for a, w, t in zip(arrays, public, _dlpack.export_batch(arrays, device), strict=True):
        if not (
            type(t) is torch.Tensor
            and t.dtype == w.dtype
            and t.shape == w.shape
            and t.device == w.device
            and torch.equal(t, w)
        ):
            return f"export_batch of a {a.dtype} array gave {t!r}, torch.from_dlpack {w!r}"
    return None


def _warn(device: torch.device, problem: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    import jaxlib

    warnings.warn(
        "torch_compat: the direct DLPack exchange (jaxlib's dlpack_managed_tensor_to_buffer "
        "and buffer_to_dlpack_managed_tensor, torch's to_dlpack and _from_dlpack) failed its "
        f"check against jax.dlpack.from_dlpack and torch.from_dlpack on '{device}': {problem}. "
        "The public functions are used instead from now on (the same results, with more host "
        f"work per batch). jax {jax.__version__}, jaxlib {getattr(jaxlib, '__version__', '?')}, "
        f"torch {torch.__version__}: please report this combination. Shown once per process.",
        FastPathWarning,
        stacklevel=4,
    )
