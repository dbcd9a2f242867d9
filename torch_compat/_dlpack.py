"""torch <-> jax exchange through DLPack: zero-copy on CPU, and on CUDA when jax has a GPU.

``to_jax`` hands a tensor's memory to jax without copying it when it can: a CPU tensor
(64-byte aligned, as torch allocates it), or a CUDA tensor when jax has a GPU backend.
``to_torch`` hands a jax result back the same way and restores the tensor's dtype and device.

Copies happen only where they must:
  - a non-contiguous tensor is made contiguous, and a misaligned one (a view with a storage
    offset, see ``CPU_ALIGNMENT``) is copied by torch: on the CPU jax would copy it anyway,
    and XLA:GPU refuses it; so is a pinned CPU tensor;
  - float64 is narrowed to float32 unless jax runs with ``jax_enable_x64`` (the result is cast
    back to float64);
  - a tensor on a device jax cannot read (CUDA while jax is CPU-only, MPS, XPU...) goes
    through host memory, with one ``HostCopyWarning`` per process.

jax may still be reading an input when ``to_jax``'s caller moves on (dispatch is
asynchronous): the jax array keeps the tensor alive, but the tensor must not be written in
place until the jax result that depends on it has been read.

``import_batch`` and ``export_batch`` are the callback's per-batch exchange, for tensors it
has already checked (see their docstrings): DLPack capsules made and read by torch's and
jaxlib's C functions, with the stream ordering done once per batch, not once per tensor.
On CUDA the order is:

  - import: torch's current stream records an event that jax's external-ready-events stream
    waits on (what ``t.__dlpack__(stream=...)`` does for every tensor), then each tensor's
    capsule is imported on that stream, so jax never reads a tensor before torch wrote it
    and the host never waits;
  - export: each capsule is made with torch's current stream as the consumer stream, so
    jax makes that stream wait for the result (what ``torch.from_dlpack(a)`` does per
    array), and torch's later kernels never read it early.

On CPU there are no streams: an imported tensor is ready, and jaxlib's export waits for
the result on the host (torch has no way to wait for it later).
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np
import torch
import torch.utils.dlpack

# The first-use check of the direct calls below (a module object: the two import each other).
from torch_compat import _dlpack_check

try:
    # What jax.dlpack.from_dlpack calls once it has found the device and stream. On CPU that
    # search costs ~70 us a call (it raises and catches an error for the missing stream), more
    # than the whole normalization of a batch of image scores; on CUDA the public function
    # costs ~60 us. So tensors of the dtypes jax keeps as they are take this call directly.
    # Its signature changed across jaxlibs: (capsule, device, stream) in jax 0.7, then
    # (..., copy) and (..., copy, dl_device_type); the arities are tried newest first, and
    # when none fits, the public function is used for good.
    from jax._src.lib import _jax as _jaxlib
except ImportError:  # pragma: no cover - depends on the jaxlib
    _jaxlib = None
fast_from_dlpack = getattr(_jaxlib, "dlpack_managed_tensor_to_buffer", None)
_fast_arities = [5, 4, 3]
_fast_works = False  # one call succeeded: _fast_arities[0] is this jaxlib's arity
# What jax.Array.__dlpack__ calls after its checks (~8 us a call on CPU; this is ~1 us).
fast_to_dlpack = getattr(_jaxlib, "buffer_to_dlpack_managed_tensor", None)
# torch's C functions behind torch.utils.dlpack (no stream handling: done per batch here).
_to_capsule = torch.utils.dlpack.to_dlpack
_from_capsule = getattr(torch._C, "_from_dlpack", torch.utils.dlpack.from_dlpack)

KDL_CPU = 1  # DLDeviceType.kDLCPU
_KDL_CUDA = 2  # DLDeviceType.kDLCUDA
# Canonical in jax with or without x64, so the public function would not convert them.
_FAST_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool})


# Integer dtypes jax keeps only with x64 (it casts them to 32 bits, wrapping, without it).
_WIDE_INTS = frozenset(dt for dt in (torch.int64, getattr(torch, "uint64", None)) if dt is not None)

_BFLOAT16 = np.dtype(jax.numpy.bfloat16)

# Where jax reads DLPack memory in place. Its CPU client copies a buffer that does not start at
# 64 bytes (and jaxlib 0.6/0.7 log a warning each time); XLA:GPU copies nothing and refuses a
# misaligned entry parameter when the computation runs (16 bytes in XLA's sources; 256 here,
# a margin that torch's CUDA allocator meets with its 512-byte blocks). So a view that starts
# elsewhere (a storage offset: ``t[1:]``, a ``split`` chunk) is copied by torch first.
CPU_ALIGNMENT = 64
CUDA_ALIGNMENT = 256


def misaligned(t: torch.Tensor) -> bool:
    """Whether jax would copy (CPU) or refuse (CUDA) ``t``'s memory as it is."""
    return t.data_ptr() % (CPU_ALIGNMENT if t.is_cpu else CUDA_ALIGNMENT) != 0


class HostCopyWarning(UserWarning):
    """A tensor went through host memory because jax has no backend for its device."""


_host_copy_warned = False


@functools.cache
def _jax_platforms() -> frozenset[str]:
    platforms = set()
    for platform in ("cpu", "gpu"):
        try:
            if jax.devices(platform):
                platforms.add(platform)
        except RuntimeError:  # no backend of that kind
            pass
    return frozenset(platforms)


@functools.cache
def local_cpu() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]


@functools.cache
def jax_gpu(index: int) -> tuple[jax.Device | None, int | None]:
    """The jax device of CUDA ordinal ``index``, and the stream jax reads external data on.

    ``(None, None)`` when jax does not see that GPU: the public function then explains.
    """
    matches = [d for d in jax.local_devices(backend="gpu") if d.local_hardware_id == index]
    if not matches:
        return None, None
    device = matches[0]
    try:
        # PJRT hands out its external-ready-event streams round-robin (4 per device) and
        # accepts any of them: one is kept, where jax.dlpack.from_dlpack asks at every call.
        stream = device.get_stream_for_external_ready_events()
    except Exception:  # noqa: BLE001  UNIMPLEMENTED on some backends: no stream, as jax does
        stream = None
    return device, stream


def fast_call(t: torch.Tensor, device: jax.Device, stream: int | None, dl_type: int):
    global fast_from_dlpack, _fast_works
    ordered = dl_type == KDL_CPU
    if dl_type == _KDL_CUDA and stream is not None:
        # jax's stream waits for torch's current stream (an event, no host wait), as
        # ``t.__dlpack__(stream=stream)`` would order it, without that method's Python work;
        # jax then reads the memory on that stream: never before torch has produced it.
        index = _cuda_index(t.device)
        _order_after_torch(index, stream, torch.cuda.current_stream(index))
        ordered = True
    while _fast_arities:
        capsule = _to_capsule(t) if ordered else t.__dlpack__()
        args = (capsule, device, stream, None, dl_type)[: _fast_arities[0]]
        try:
            out = fast_from_dlpack(*args)
        except TypeError:  # another jaxlib's signature: try the next arity
            _fast_arities.pop(0)
            continue
        _fast_works = True
        return out
    fast_from_dlpack = None
    return None


def _from_dlpack(t: torch.Tensor) -> jax.Array:
    if (
        fast_from_dlpack is not None
        and t.dtype in _FAST_DTYPES
        and _dlpack_check.fast_path_ok(t.device)
    ):
        out = None
        if t.device.type == "cpu":
            out = fast_call(t, local_cpu(), None, KDL_CPU)
        elif t.device.type == "cuda":
            device, stream = jax_gpu(t.device.index if t.device.index is not None else 0)
            if device is not None:
                out = fast_call(t, device, stream, _KDL_CUDA)
        if out is not None:
            return out
    return jax.dlpack.from_dlpack(t)


def jax_reads_device(device: torch.device) -> bool:
    """Whether jax can take a tensor on ``device`` through DLPack without a host copy."""
    if device.type == "cpu":
        return True
    # jax's "gpu" backend is CUDA or ROCm; torch calls both "cuda".
    return device.type == "cuda" and "gpu" in _jax_platforms()


def _warn_host_copy(device: torch.device) -> None:
    global _host_copy_warned
    if _host_copy_warned:
        return
    _host_copy_warned = True
    warnings.warn(
        f"torch_compat: jax has no backend for torch device '{device}' (jax platforms: "
        f"{sorted(_jax_platforms())}), so tensors on it are copied to host memory, normalized "
        "on the CPU and copied back. Install jax with GPU support (e.g. `pip install "
        "jax[cuda12]`) for zero-copy exchange. Shown once per process.",
        HostCopyWarning,
        stacklevel=3,
    )


def to_jax(tensor: torch.Tensor, *, name: str = "tensor") -> jax.Array:
    """A jax array over ``tensor``'s memory (zero-copy when possible, see the module doc).

    The tensor is detached first: the result carries no autograd history. Without
    ``jax_enable_x64``, 64-bit integers become float32 here (jax would wrap them to int32).

    Args:
      tensor: any strided tensor.
      name: what to call the tensor in error messages (e.g. ``"outputs['anomaly_maps']"``).

    Raises:
      ValueError: the tensor is on the ``meta`` device (it has no values).
    """
    t = tensor.detach() if tensor.requires_grad else tensor
    if t.device.type == "meta":
        raise ValueError(
            f"{name}: a tensor on the 'meta' device (shape {tuple(t.shape)}, {t.dtype}) has no "
            "values; materialize it first (e.g. `module.to_empty(device=...)` then load the "
            "weights, or `.to('cpu')` after filling it)."
        )
    if t.dtype in _WIDE_INTS and not jax.config.jax_enable_x64:
        # jax would cast them to int32 and wrap values beyond 2**31; float32 rounds instead,
        # as the float64 path narrows (scores are compared in float32 anyway).
        t = t.float()
    if not jax_reads_device(t.device):
        _warn_host_copy(t.device)
        t = t.cpu()
    elif t.device.type == "cpu" and cuda_available() and t.is_pinned():
        # DLPack labels pinned memory as CUDA host memory, which jax reads as a CUDA device.
        t = t.clone()
    if t.dtype == torch.float64 and not jax.config.jax_enable_x64:
        # jax would narrow it anyway, with a copy of its own; casting here keeps one copy.
        t = t.float()
    if not t.is_contiguous():
        t = t.contiguous()
    elif misaligned(t):
        t = t.clone()  # see CPU_ALIGNMENT: a fresh tensor starts aligned
    return _from_dlpack(t)


def to_torch(array: jax.Array, like: torch.Tensor) -> torch.Tensor:
    """A torch tensor over ``array``'s memory, with ``like``'s device and floating dtype.

    Zero-copy unless the dtype or device has to change (float64 without x64, or the host
    copy of ``to_jax``). A result that is floating where ``like`` is an integer tensor keeps
    its floating dtype: normalized scores do not fit in integers.
    """
    return _match(torch.from_dlpack(array), like)


def host_to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``to_torch`` for a writable numpy array on the host (zero-copy on a CPU ``like``)."""
    if array.dtype == _BFLOAT16:  # numpy knows it only through ml_dtypes; torch reads the bits
        return _match(torch.from_numpy(array.view(np.int16)).view(torch.bfloat16), like)
    return _match(torch.from_numpy(array), like)


def _match(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out.device != like.device:
        out = out.to(like.device)
    if out.dtype != like.dtype and like.is_floating_point():
        out = out.to(like.dtype)
    return out


# -- the callback's per-batch exchange -------------------------------------------------------


@functools.cache
def cuda_available() -> bool:
    """Whether torch sees CUDA (asked once): then DLPack labels pinned CPU memory as CUDA
    host memory, which jax would read as a CUDA device, so pinned tensors are copied."""
    return torch.cuda.is_available()


def batch_device_ok(device: torch.device) -> bool:
    """Whether ``import_batch`` and ``export_batch`` take tensors on ``device``.

    They need jaxlib's direct calls, checked on this device (``_dlpack_check``), and on CUDA a
    jax GPU with an external-ready-events stream; elsewhere ``to_jax`` and ``to_torch``
    remain.
    """
    if fast_from_dlpack is None or fast_to_dlpack is None:
        return False
    if not (_dlpack_check.fast_path_ok(device) and _fast_works):
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or "gpu" not in _jax_platforms():
        return False
    return jax_gpu(_cuda_index(device))[1] is not None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _jax_stream_as_torch(index: int, stream: int) -> torch.cuda.ExternalStream:
    # The external-ready-events stream kept per device by jax_gpu: wrap it once.
    return torch.cuda.ExternalStream(stream, device=torch.device("cuda", index))


@functools.cache
def _event(index: int) -> torch.cuda.Event:
    # One event per device, recorded again at every batch: a wait already queued keeps the
    # record it saw, so reusing the event is safe and saves creating one per batch.
    return torch.cuda.Event()


def torch_stream(device: torch.device) -> torch.cuda.Stream | None:
    """torch's current stream on ``device`` (``None`` on the CPU): looked up once per batch
    and handed to ``import_batch`` and ``export_batch``."""
    return torch.cuda.current_stream(_cuda_index(device)) if device.type == "cuda" else None


def _order_after_torch(index: int, stream: int, ours: torch.cuda.Stream) -> None:
    """Makes jax's stream ``stream`` wait for the work queued so far on torch's stream
    ``ours``: one event for the batch, no host wait (``Tensor.__dlpack__(stream=...)``'s
    ordering, once)."""
    theirs = _jax_stream_as_torch(index, stream)
    if ours != theirs:
        event = _event(index)
        event.record(ours)
        theirs.wait_event(event)


def import_batch(
    tensors: list[torch.Tensor], device: torch.device, stream: torch.cuda.Stream | None = None
) -> list[jax.Array]:
    """Zero-copy jax arrays over ``tensors``, with one stream ordering for the batch.

    For tensors already checked by the caller: on ``device`` (where ``batch_device_ok``),
    contiguous, not requiring grad, of a dtype jax keeps as it is (float32, float16,
    bfloat16, int32, bool), and not in pinned memory. ``stream``: ``torch_stream(device)``
    when the caller has it already.
    """
    if device.type == "cpu":
        jax_device, stream, dl_type = local_cpu(), None, KDL_CPU
    else:
        index = _cuda_index(device)
        jax_device, jax_stream = jax_gpu(index)
        dl_type = _KDL_CUDA
        ours = stream if stream is not None else torch_stream(device)
        _order_after_torch(index, jax_stream, ours)
        stream = jax_stream  # jax reads the tensors on its stream, after the event
    arity = _fast_arities[0]
    return [
        fast_from_dlpack(*(_to_capsule(t), jax_device, stream, None, dl_type)[:arity])
        for t in tensors
    ]


_export_whole = True  # jaxlib takes a single-device jax.Array as it is (found at first export)


def export_batch(
    arrays, device: torch.device, stream: torch.cuda.Stream | None = None
) -> list[torch.Tensor]:
    """Zero-copy tensors over jax arrays on ``device``'s jax twin (where ``batch_device_ok``).

    On CUDA, torch's current stream (``stream``, else looked up once for the batch) waits
    for each array on the device; on CPU, each export waits for its array on the host.
    """
    if device.type == "cuda":
        stream = (stream if stream is not None else torch_stream(device)).cuda_stream
        if stream == 0 and torch.version.hip is None:
            stream = 1  # DLPack's number for CUDA's legacy default stream
    else:
        stream = None
    global _export_whole
    if _export_whole:
        try:
            return [_from_capsule(fast_to_dlpack(a, stream=stream)) for a in arrays]
        except TypeError:  # a jaxlib that takes single-device buffers only
            _export_whole = False
    return [_from_capsule(fast_to_dlpack(a.addressable_data(0), stream=stream)) for a in arrays]


def wait_for(array: jax.Array, device: torch.device) -> None:
    """Orders torch's later work on ``device`` after the jax computation that made ``array``.

    Once that computation is done, jax has read the tensors it imported zero-copy from
    ``device``: torch may then write them in place, or reuse their memory. On CUDA, torch's
    current stream waits for ``array`` (an event, as an export orders it: the host does not
    wait); on the CPU there are no streams, so the host waits. Tensors of a device jax
    cannot read went through host memory (``to_jax``'s copy): nothing to order.
    """
    if device.type == "cpu":
        array.block_until_ready()
    elif jax_reads_device(device):
        if batch_device_ok(device):
            export_batch([array], device)
        else:
            torch.from_dlpack(array)  # the public export orders torch's current stream too
