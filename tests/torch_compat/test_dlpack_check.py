"""The first-use check of the direct DLPack calls (issue 20, deliverable 5), on the CPU.

``torch_compat._dlpack`` crosses tensors through jaxlib's and torch's C functions; on CUDA
that code never ran in CI. Before their first use on a device they are checked against the
public ``jax.dlpack.from_dlpack`` / ``torch.from_dlpack``; here the direct calls are made to
fail or to return wrong values (monkeypatched), as a broken CUDA build would, and the
exchange must fall back to the public functions with one warning, values intact.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
import torch

from tests.torch_compat import module_protocol as h
from torch_compat import FastPathWarning, _dlpack, _dlpack_check, to_jax, to_torch
from torch_compat.pytorch_lightning import MinMaxNormalizationCallback

CPU = torch.device("cpu")

if _dlpack.fast_from_dlpack is None or _dlpack.fast_to_dlpack is None:  # pragma: no cover
    pytest.skip("this jaxlib has no direct DLPack calls to check", allow_module_level=True)


@pytest.fixture
def unchecked(monkeypatch):
    """No device checked yet and no warning shown, as in a fresh process."""
    monkeypatch.setattr(_dlpack_check, "_verdicts", {})
    monkeypatch.setattr(_dlpack_check, "_warned", False)


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _versions_named(message: str) -> bool:
    return all(
        v in message
        for v in (
            f"jax {jax.__version__}",
            f"jaxlib {jaxlib.__version__}",
            f"torch {torch.__version__}",
        )
    )


# -- a healthy fast path passes and is used --------------------------------------------------


def test_the_direct_calls_pass_their_check_silently_and_are_used(unchecked, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dlpack_check.fast_path_ok(CPU)
    calls = _spy(monkeypatch, _dlpack, "fast_from_dlpack")
    public = _spy(monkeypatch, jax.dlpack, "from_dlpack")
    t = torch.arange(6.0)
    np.testing.assert_array_equal(np.asarray(to_jax(t)), t.numpy())
    assert calls == [1] and public == []  # the verdict is kept: no second probe
    assert _dlpack.batch_device_ok(CPU)


def test_the_check_runs_once_per_device_before_the_first_use(unchecked, monkeypatch):
    checks = _spy(monkeypatch, _dlpack_check, "_probe")
    for _ in range(3):
        to_jax(torch.ones(3))
        _dlpack.batch_device_ok(CPU)
    assert checks == [1]


# -- a broken fast path falls back to the public functions, with one warning ----------------


def _raising(*args):
    raise RuntimeError("a jaxlib that crashes in dlpack_managed_tensor_to_buffer")


def _zeros(real):
    return lambda *args: jnp.zeros_like(real(*args))  # right dtype and shape, wrong values


def _elsewhere(real):
    return lambda *args: jax.device_put(real(*args), jax.devices("cpu")[1])  # wrong device


BROKEN_IMPORTS = {
    "raises": lambda real: _raising,
    "wrong values": _zeros,
    "wrong device": _elsewhere,
    "wrong dtype": lambda real: lambda *args: real(*args).astype(jnp.float32),
}


@pytest.mark.parametrize("broken", list(BROKEN_IMPORTS))
def test_a_broken_direct_import_falls_back_to_the_public_one_with_one_warning(
    unchecked, monkeypatch, broken
):
    monkeypatch.setattr(
        _dlpack, "fast_from_dlpack", BROKEN_IMPORTS[broken](_dlpack.fast_from_dlpack)
    )
    t = torch.tensor([-2.0, 0.5, 3.25])
    with pytest.warns(FastPathWarning) as record:
        got = to_jax(t)
    assert len(record) == 1
    message = str(record[0].message)
    assert _versions_named(message), message
    assert "'cpu'" in message and "jax.dlpack.from_dlpack" in message
    np.testing.assert_array_equal(np.asarray(got), t.numpy())
    assert got.devices() == {jax.devices("cpu")[0]}
    # From then on: the public path, silently, for tensors and for the callback's batches.
    fast = _spy(monkeypatch, _dlpack, "fast_from_dlpack")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.bfloat16, torch.int32, torch.bool):
            u = torch.tensor([1, 0, 3]).to(dtype)
            np.testing.assert_array_equal(
                np.asarray(to_jax(u), np.float32), u.float().numpy(), err_msg=str(dtype)
            )
        assert not _dlpack.batch_device_ok(CPU)
    assert fast == []


def test_a_broken_direct_export_falls_back_to_the_public_one(unchecked, monkeypatch):
    real = _dlpack._from_capsule
    monkeypatch.setattr(_dlpack, "_from_capsule", lambda c: torch.zeros_like(real(c)))
    with pytest.warns(FastPathWarning, match="export_batch") as record:
        assert not _dlpack.batch_device_ok(CPU)
    assert len(record) == 1 and _versions_named(str(record[0].message))
    a = jnp.array([1.0, -2.0, 4.5])
    assert torch.equal(to_torch(a * 2, like=torch.zeros(3)), torch.tensor([2.0, -4.0, 9.0]))


def test_a_raising_direct_export_falls_back_to_the_public_one(unchecked, monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("buffer_to_dlpack_managed_tensor failed")

    monkeypatch.setattr(_dlpack, "fast_to_dlpack", raising)
    with pytest.warns(FastPathWarning, match="buffer_to_dlpack_managed_tensor failed"):
        assert not _dlpack.batch_device_ok(CPU)


def test_the_warning_is_shown_once_per_process_whatever_fails_next(unchecked, monkeypatch):
    monkeypatch.setattr(_dlpack, "fast_from_dlpack", _raising)
    with pytest.warns(FastPathWarning):
        to_jax(torch.ones(2))
    monkeypatch.setattr(_dlpack_check, "_verdicts", {})  # another device's first use
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(to_jax(torch.ones(2))), np.ones(2))


def test_no_known_signature_is_the_designed_silent_fallback(unchecked, monkeypatch):
    # jaxlibs whose direct import takes other arguments: given up for good, no warning.
    def never(*args):
        raise TypeError("incompatible function arguments")

    monkeypatch.setattr(_dlpack, "fast_from_dlpack", never)
    monkeypatch.setattr(_dlpack, "_fast_arities", [5, 4, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(to_jax(torch.ones(2))), np.ones(2))
    assert _dlpack.fast_from_dlpack is None


# -- the callback with a broken fast path: anomalib's values, one warning --------------------


@pytest.mark.parametrize("broken", ["raises", "wrong values"])
def test_the_callback_with_a_broken_fast_path_matches_the_reference(unchecked, monkeypatch, broken):
    monkeypatch.setattr(
        _dlpack, "fast_from_dlpack", BROKEN_IMPORTS[broken](_dlpack.fast_from_dlpack)
    )
    val = [h.make_outputs(s, boxes=False) for s in range(2)]
    raw_val = [h.clone(b) for b in val]
    module, cb = h.Module(), MinMaxNormalizationCallback()
    cb.setup(None, module, "fit")
    with pytest.warns(FastPathWarning) as record:
        h.validate(cb, module, val)
        lo, hi = h.reference.min_max(*[h.reference.stats_source(h.to_numpy(b)) for b in raw_val])
        cb.on_test_start(None, module)
        for seed in (5, 6, 7):  # later batches would take the steady path
            raw = h.make_outputs(seed, boxes=False)
            outputs = h.clone(raw)
            cb.on_test_batch_end(None, module, outputs, None, seed)
            h.assert_matches_reference(outputs, raw, h.IMAGE_T, h.PIXEL_T, lo, hi)
    assert len([r for r in record if r.category is FastPathWarning]) == 1
    assert re.search(r"jaxlib \S+, torch", str(record[0].message))


def test_a_dtype_the_public_functions_refuse_is_not_held_against_the_direct_calls(
    unchecked, monkeypatch
):
    # torch < 2.2 exports no bool tensor through DLPack, whichever way (seen on the floor,
    # torch 2.1): the check compares the dtypes both ways can cross.
    real = jax.dlpack.from_dlpack

    def no_bool(t, *args, **kwargs):
        if t.dtype == torch.bool:
            raise RuntimeError("Bool type is not supported by dlpack")
        return real(t, *args, **kwargs)

    monkeypatch.setattr(jax.dlpack, "from_dlpack", no_bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dlpack_check.fast_path_ok(CPU)
