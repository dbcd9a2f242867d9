"""Change detection: how an adapter knows, without waiting for a device, that a tensor it
read before (a threshold, a statistic, a buffer) still holds what it read.

A cache keyed by these must never outlive the value it stands for; the rule of each key is
written next to it.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

# Whether reading a tensor waits for no device (a test stands in accelerators here).
on_host = operator.attrgetter("is_cpu")


class Watched:
    """Remembers which tensors (and which contents of them: ``contents``, or in-place
    versions: ``version``) host values came from.

    Reading a CUDA tensor's value on the host waits for the GPU; comparing identities,
    storages and version counters does not, so unchanged thresholds and statistics on an
    accelerator are never read again.
    """

    __slots__ = ("tensors", "versions")

    def __init__(self) -> None:
        self.tensors: tuple = ()
        self.versions: tuple | None = None

    def unchanged(self, tensors: tuple, versions: tuple | None) -> bool:
        return (
            versions is not None
            and versions == self.versions
            and len(tensors) == len(self.tensors)
            and all(a is b for a, b in zip(tensors, self.tensors, strict=True))
        )

    def remember(self, tensors: tuple, versions: tuple | None) -> None:
        self.tensors, self.versions = tensors, versions

    def forget(self) -> None:
        self.remember((), None)


def version(value: Any) -> Any:
    """What tells an in-place write of ``value`` apart, without reading it; ``None``:
    unknown, read it again. (anomalib 2's PostProcessor keys its buffers by this; the
    callback by ``contents``.)"""
    if not isinstance(value, torch.Tensor):
        return None
    if value.is_inference():
        # Inference tensors keep no version counter. On the CPU a read costs nothing; on an
        # accelerator it would wait for the device at every batch, so there the tensor's
        # identity decides (anomalib replaces its thresholds and states, not writes them).
        return None if value.device.type == "cpu" else "inference"
    return value._version


def versions(tensors: tuple) -> tuple | None:
    keys = tuple(version(t) for t in tensors)
    return None if None in keys else keys


def contents(value: Any) -> Any:
    """What tells a change of ``value``'s contents apart without waiting for a device;
    ``None``: unknown, read it again.

    On the CPU (and for Python or numpy numbers) the value itself, read (~0.2 us): it sees
    every write, also those that leave the version counter as it was (through ``.data``, a
    numpy alias, inference mode) or swap the storage (``t.data = ...``). On an accelerator
    a read would wait for the device at every batch, so the storage and the in-place
    version counter decide, and for inference tensors (no counter) the storage alone
    (anomalib replaces its thresholds and states rather than writing them).
    """
    if isinstance(value, torch.Tensor):
        if not on_host(value):
            if value.is_inference():
                return ("inference", value.data_ptr())
            return (value._version, value.data_ptr())
        try:
            number = value.item()
        except RuntimeError:  # not one number: the caller reads it and names the problem
            return None
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.size != 1:
            return None
        number = value.item()
    elif isinstance(value, (int, float)):
        number = value
    else:
        return None
    return number if number == number else "nan"  # NaN keys compare equal


def contents_of(tensors: tuple) -> tuple | None:
    keys = tuple(contents(t) for t in tensors)
    return None if None in keys else keys
