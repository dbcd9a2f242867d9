"""Change detection: the rule every cache of the adapters keeps.

An adapter caches what it read of a threshold, a statistic or a sensitivity (its checks, its
device copy) so that a batch does not read it again. Such a cache stands for the value it was
made from, and must never outlive it. The rule, for every cache in ``torch_compat``:

- **On the host** (a CPU tensor, a numpy or Python number) the key is the value itself,
  read (``key``: ~0.2 us, it waits for nothing), with its dtype. A hit means an equal value
  of the same dtype: exact by construction, whatever made it so: an in-place op, a write
  through ``.data`` or ``.data =``, a numpy or DLPack alias, inference mode,
  ``load_state_dict`` (also ``assign=True``), a dtype or device conversion of the module.
- **On an accelerator** a read waits for the device, so no cache stands for a value there:
  the values travel with every batch (``gather``: one torch op stacks them into one small
  tensor, which crosses with the batch's own tensors). Only host-side *checks* (finite,
  ordered, present) are keyed, by the tensor's identity, storage pointer, device, dtype and
  in-place version counter (identity and storage alone for inference tensors, which keep no
  counter). A write that leaves all of these as they were (through ``.data``, a DLPack
  alias, inference mode) is used as anomalib uses it, without those checks (see
  docs/differences.md).
- **Copies**: ``copy.copy``, ``copy.deepcopy`` and pickles of a ``Watched`` are empty, so
  whatever holds one (a callback, a post-processor's state) reads again after a copy: a
  copy's version counters restart, and could meet a remembered key by chance.

A cache that stands for what the *hook* holds (not an outside tensor) is valid only while
the hook still holds it: ``hook.stats`` is a new object at every change, and such caches
remember it and compare it by identity (see ``_lifecycle.StatsLink``).
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

# Whether reading a tensor waits for no device (a test stands in accelerators here).
on_host = operator.attrgetter("is_cpu")


def key(value: Any) -> Hashable | None:
    """The cache key of one value, by the rule above; ``None``: unknown (not one number, or
    not a number at all): read it again, and name the problem there."""
    if isinstance(value, torch.Tensor):
        if not on_host(value):
            version = "inference" if value.is_inference() else value._version
            return ("device", value.device, value.dtype, value.data_ptr(), version)
        try:
            number = value.item()
        except RuntimeError:  # not one number
            return None
        return (value.dtype, number if number == number else _NAN)
    if isinstance(value, (np.ndarray, np.generic)):
        if value.size != 1:
            return None
        number = value.item()
        return (value.dtype, number if number == number else _NAN)
    if isinstance(value, (bool, int, float)):
        return (type(value), value if value == value else _NAN)
    return None


def keys(values: Sequence[Any]) -> tuple | None:
    """``key`` of each value; ``None`` when one is unknown."""
    out = tuple(key(v) for v in values)
    return None if None in out else out


_NAN = "nan"  # NaN is not equal to itself: its key is this, so NaN keys compare equal


def all_on_host(values: Sequence[Any]) -> bool:
    """Whether reading each of ``values`` waits for no device (numbers, host tensors)."""
    return all(not isinstance(v, torch.Tensor) or on_host(v) for v in values)


def on_device(values: Sequence[Any]) -> torch.device | None:
    """The one accelerator device of ``values`` when every one is a tensor there (their
    values then travel: ``gather``), else ``None``."""
    device = None
    for v in values:
        if not isinstance(v, torch.Tensor) or on_host(v) or v.device.type == "meta":
            return None
        if device is None:
            device = v.device
        elif v.device != device:
            return None
    return device


def gather(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values of 0-d or one-element ``tensors`` as one 1-D tensor on their device: one
    ``torch.stack`` (and a cast only when ``dtype`` differs). No host read."""
    if any(t.ndim for t in tensors):  # one-element tensors of another shape
        tensors = [t.reshape(()) for t in tensors]
    if any(t.requires_grad for t in tensors):
        tensors = [t.detach() for t in tensors]
    out = torch.stack(tensors)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


class Watched:
    """The objects a cache was made from and their ``keys``: a hit needs the same objects
    (by identity) with equal keys. Copies and pickles are empty (see the module doc)."""

    __slots__ = ("objects", "keys")

    def __init__(self) -> None:
        self.forget()

    def unchanged(self, objects: Sequence[Any], keys: tuple | None) -> bool:
        return (
            keys is not None
            and keys == self.keys
            and len(objects) == len(self.objects)
            and all(a is b for a, b in zip(objects, self.objects, strict=True))
        )

    def remember(self, objects: Sequence[Any], keys: tuple | None) -> None:
        self.objects, self.keys = tuple(objects), keys

    def forget(self) -> None:
        self.objects, self.keys = (), None

    def __reduce__(self):
        return (Watched, ())  # copies and pickles are empty: they read again
