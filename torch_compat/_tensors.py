"""Small torch helpers every adapter needs: in-place writes of statistics, and the meta check."""

from __future__ import annotations

from typing import Any

import torch


def write_in_place(tensor: torch.Tensor, value: float | torch.Tensor) -> None:
    """Writes ``value`` into ``tensor`` in place: its device, dtype and identity stay."""
    # An inference tensor (made under torch.inference_mode, as Lightning's evaluation loops
    # are) can only be written inside inference mode; any other tensor under no_grad.
    context = torch.inference_mode() if tensor.is_inference() else torch.no_grad()
    with context:
        if isinstance(value, torch.Tensor):
            tensor.copy_(value.reshape(tensor.shape))
        else:
            tensor.fill_(value)


def check_not_meta(source: str, key: str, value: Any) -> None:
    """Raises for a tensor on the ``meta`` device (it has no value), naming ``source``/``key``."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(
            f"{source}: '{key}' is a tensor on the 'meta' device, which has no value; load the "
            "weights into the module (e.g. `module.to_empty(device='cpu')` then "
            "`load_state_dict`) before testing or predicting."
        )
