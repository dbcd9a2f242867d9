"""The exchange of a batch's tensors with the hook: views, padding, the batch device, and
the hand-back.

- ``JaxView``: a step's outputs as the hook reads them, each key converted on first access;
- ``pad_rows``: a batch of a new, odd size padded in torch to the hook's bucket;
- ``batch_device`` and ``exchangeable``: whether tensors can cross in one
  ``_dlpack.import_batch`` call, and as what;
- ``Layout``: the keys, dtypes, shapes and device a first batch settled, which later batches
  are matched against on the host;
- ``hand_back``: tensors returned to torch once the hook's fold has read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from jaxnorm import MinMaxNormalizationHook
from jaxnorm._src import batching
from jaxnorm._src.stats import NORMALIZED_KEYS
from torch_compat import _dlpack
from torch_compat._dlpack import to_jax

# Dtypes a batch may cross with in one import: jax keeps them as they are, and a normalized
# result has the same dtype, so nothing is cast on either side.
PLAN_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
NUMPY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# The keys whose leading axis is the batch axis (box_scores are bucketed by the hook itself).
ROW_KEYS = ("pred_scores", "anomaly_maps")
_ROWS = "rows"  # the adapters' one bucket key: both keys share their batch size


def check_tensor(key: str, value: Any) -> torch.Tensor:
    """``value`` when it is a tensor; else the error of anomalib's outputs protocol."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"outputs['{key}']: expected a torch.Tensor, got {type(value).__name__}; "
            "return tensors from the step (anomalib's outputs protocol)."
        )
    return value


class JaxView(Mapping):
    """The normalized keys of a step's outputs (and the label keys asked for), converted to
    jax on first access."""

    __slots__ = ("_outputs", "_keys", "_cache", "devices")

    def __init__(self, outputs: Any, labels: tuple[str, ...] = ()) -> None:
        if not isinstance(outputs, Mapping):
            raise ValueError(
                f"outputs: expected the dict a step returns, got {type(outputs).__name__}; "
                "return a dict with 'anomaly_maps', 'box_scores' or 'pred_scores'."
            )
        self._outputs = outputs
        self._keys = [key for key in (*NORMALIZED_KEYS, *labels) if key in outputs]
        self._cache: dict[str, Any] = {}
        self.devices: set[torch.device] = set()  # of the tensors converted so far

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            if key not in self._keys:
                raise KeyError(key)
            value = self._outputs[key]
            if key == "box_scores" and isinstance(value, (list, tuple)):
                tensors = [check_tensor(f"{key}[{i}]", b) for i, b in enumerate(value)]
                # Flat, as anomalib's torch.cat takes (k, 1) or (k,) entries alike; each
                # comes back in its own shape.
                self._cache[key] = [
                    to_jax(b.reshape(-1), name=f"outputs['{key}'][{i}]")
                    for i, b in enumerate(tensors)
                ]
                self.devices.update(b.device for b in tensors)
            elif key == "box_scores" and isinstance(value, torch.Tensor):
                raise ValueError(
                    f"outputs['box_scores']: expected a list with one tensor of box scores "
                    f"per image (anomalib's outputs protocol), got one tensor of shape "
                    f"{tuple(value.shape)}; wrap the per-image tensors in a list."
                )
            else:
                # Anything else goes to the hook, which names what is wrong with it.
                t = check_tensor(key, value)
                self._cache[key] = to_jax(t, name=f"outputs['{key}']")
                self.devices.add(t.device)
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def pad_rows(
    outputs: Any, buckets: batching.Buckets, phase: str, keys: tuple[str, ...] = ROW_KEYS
) -> tuple[Any, int | None]:
    """Pads the batch axis in torch when a batch has a new, odd size, so jax compiles per
    bucket and not per size; slicing back is a torch view. Returns ``(outputs, n)``, with
    ``outputs`` a padded shallow copy and ``n`` the true size, or ``(outputs, None)``.

    torch pads and slices without compiling anything, on every device; the hook's own
    padding would compile a pad per size for CUDA arrays, and on the CPU wait for the slice.
    ``keys``: those padded (the F1 thresholds' labels too, where a batch feeds them).
    """
    if not isinstance(outputs, Mapping):
        return outputs, None  # JaxView names the problem
    present = [outputs[key] for key in keys if key in outputs]
    if not present or not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in present):
        return outputs, None
    sizes = {t.shape[0] for t in present}
    if len(sizes) != 1 or any(t.device.type == "meta" for t in present):
        return outputs, None  # the hook buckets each key itself, or names the problem
    n = sizes.pop()
    rows = buckets.rows(phase, _ROWS, n)
    if rows == n:
        return outputs, None
    padded = dict(outputs)
    for key in keys:
        if key in outputs:
            t = outputs[key].detach()
            padded[key] = torch.cat([t, t.new_zeros((rows - n, *t.shape[1:]))])
    return padded, n


def tensor_devices(outputs: Any) -> set[torch.device]:
    """The devices of the tensors under the normalized keys of ``outputs`` (box scores' too)."""
    devices = set()
    if isinstance(outputs, Mapping):
        for key in NORMALIZED_KEYS:
            value = outputs.get(key)
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor):
                    devices.add(t.device)
    return devices


def hand_back(hook: MinMaxNormalizationHook, devices: Iterable[torch.device]) -> None:
    """Hands a validation batch's tensors on ``devices`` back to torch once ``hook``'s last
    fold has read them.

    The fold reads them zero-copy and asynchronously; a caller may write an output tensor in
    place once the hook has returned (a reused buffer, the same tensor sent again), as
    anomalib's synchronous update allowed. On CUDA torch's stream waits for the fold (no
    host wait); on the CPU the host does.
    """
    for device in devices:
        _dlpack.wait_for(hook.adapter.last_fold(), device)


def exchangeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``import_batch`` takes it: detached, and copied when jax could not read its
    memory in place (a storage offset), as ``to_jax`` does."""
    t = t.detach() if t.requires_grad else t
    return t.clone() if _dlpack.misaligned(t) else t


def batch_device(tensors: list[Any]) -> torch.device | None:
    """The one device of ``tensors`` when ``_dlpack.import_batch`` can take them (after
    ``exchangeable``); ``None`` where ``to_jax`` must take them one by one (another type or
    dtype, 0-d, devices that differ, not contiguous, pinned memory, or no direct DLPack calls
    on this jaxlib)."""
    if not tensors or type(tensors[0]) is not torch.Tensor:
        return None
    device = tensors[0].device
    for t in tensors:
        if (
            type(t) is not torch.Tensor
            or t.dtype not in PLAN_DTYPES
            or t.ndim == 0
            or t.device != device
            or not t.is_contiguous()
        ):
            return None
    if not _dlpack.batch_device_ok(device):
        return None
    # DLPack labels pinned memory as CUDA host memory: those take to_jax's copy.
    if device.type == "cpu" and _dlpack.cuda_available() and any(t.is_pinned() for t in tensors):
        return None
    return device


class Layout:
    """The keys, dtypes, shapes and device of the tensors a first batch crossed with.

    Attributes:
      keys: the keys whose tensors cross, in order.
      device: their one device.
    """

    __slots__ = ("keys", "_layout", "_also", "_others", "device", "_pinned")

    def __init__(self, keys, tensors, device: torch.device, present=None) -> None:
        """Args:
        keys: the keys that cross.
        tensors: their tensors (all on ``device``, see ``batch_device``).
        device: the device.
        present: every known output key the batch holds (default ``keys``): validation's
          shared statistics read one of several, so the others' presence is part of the
          layout.
        """
        present = keys if present is None else present
        self.keys = keys
        self._layout = tuple((k, t.dtype, t.shape) for k, t in zip(keys, tensors, strict=True))
        self._also = tuple(k for k in present if k not in keys)
        self._others = tuple(k for k in NORMALIZED_KEYS if k not in present)
        self.device = device
        # DLPack labels pinned memory as CUDA host memory: those take to_jax's copy.
        self._pinned = device.type == "cpu" and _dlpack.cuda_available()

    def tensors(self, outputs: Any) -> list[torch.Tensor] | None:
        """The batch's tensors (``exchangeable``) when ``outputs`` matches this layout, else
        ``None``."""
        if type(outputs) is not dict:
            return None
        tensors = []
        for key, dtype, shape in self._layout:
            t = outputs.get(key)
            if (
                type(t) is not torch.Tensor
                or t.dtype is not dtype
                or t.shape != shape
                or t.device != self.device
                or not t.is_contiguous()
            ):
                return None
            if self._pinned and t.is_pinned():
                return None
            tensors.append(exchangeable(t))
        for key in self._also:
            if key not in outputs:
                return None
        for key in self._others:
            if key in outputs:
                return None
        return tensors
