"""Every way a 0-d tensor held by a module can change value: for the stateful tests (issue 20).

Each write sets ``owner.<name>`` to ``value`` (rounded to the tensor's dtype, as torch
rounds it) by one method. Some leave the tensor's in-place version counter as it was
(``.data`` writes, numpy and DLPack aliases), some swap its storage (``.data =``), some
replace the object (assignment), so a cache keyed on identity, storage or version misses
some of them: only a cache that sees every value is right for all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.dlpack


def _fill(t: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        t.fill_(value)


def _numpy_alias(t: torch.Tensor, value: float) -> None:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: write its bits
        bits = torch.tensor(value, dtype=torch.bfloat16).view(torch.int16).item()
        t.view(torch.int16).numpy()[...] = bits
    else:
        t.numpy()[...] = value


def _dlpack_alias(t: torch.Tensor, value: float) -> None:
    alias = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t))
    alias.fill_(value)


def _inference_mode(t: torch.Tensor, value: float) -> None:
    with torch.inference_mode():
        t.fill_(value)


def _index(t: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        t[...] = value


def _copy(t: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        t.copy_(torch.tensor(value, dtype=torch.float64))


def _add(t: torch.Tensor, value: float) -> None:
    # In-place arithmetic that lands on value whatever t held (inf too).
    with torch.no_grad():
        t.zero_().add_(value)


# method -> write(tensor, value), for writes that keep the object.
IN_PLACE = {
    "fill_": _fill,
    "copy_": _copy,
    "index": _index,
    "zero_().add_": _add,
    "data.fill_": lambda t, v: t.data.fill_(v),
    "numpy alias": _numpy_alias,
    "dlpack alias": _dlpack_alias,
    "inference_mode": _inference_mode,
}
# ... and those that change what the attribute holds.
REPLACING = ("assign new tensor", ".data = new tensor")
METHODS = tuple(IN_PLACE) + REPLACING


def write(owner, name: str, value: float, method: str) -> None:
    """Sets ``owner.<name>`` (a tensor) to ``value`` by ``method``, keeping its dtype and
    device."""
    t = getattr(owner, name)
    if method == "assign new tensor":
        setattr(owner, name, torch.tensor(value, dtype=t.dtype, device=t.device))
    elif method == ".data = new tensor":
        t.data = torch.tensor(value, dtype=t.dtype, device=t.device)
    else:
        IN_PLACE[method](t, value)


def resolve(module: torch.nn.Module, path: str) -> tuple[object, str]:
    """``("a.b.c")`` -> (``module.a.b``, ``"c"``)."""
    *parents, name = path.split(".")
    owner = module
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as a tensor of ``dtype`` holds it."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def as_float(t) -> float:
    return float(np.float64(t.detach().double().cpu().item()))
