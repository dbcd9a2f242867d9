"""What differs between the supported flax versions (floors in pyproject.toml), in one place."""

from __future__ import annotations

import inspect

from flax import nnx

# flax >= 0.12 wants a list of submodules wrapped in nnx.List; older flax takes the list.
nnx_list = getattr(nnx, "List", list)

# flax >= 0.11: ``optimizer.update(model, grads)``; before, ``optimizer.update(grads)``.
_UPDATE_TAKES_MODEL = "model" in inspect.signature(nnx.Optimizer.update).parameters


def optimizer_update(optimizer: nnx.Optimizer, model: nnx.Module, grads) -> None:
    """Applies ``grads`` to ``model``'s parameters through ``optimizer``, on any flax."""
    if _UPDATE_TAKES_MODEL:
        optimizer.update(model, grads)
    else:  # pragma: no cover - depends on the flax
        optimizer.update(grads)


def set_variable(variable: nnx.Variable, value) -> None:
    """Replaces an ``nnx.Variable``'s whole value, on any flax.

    ``variable[...] = value`` is a scatter (an extra dispatch, compiled again when the
    placement of the value changes) on flax before 0.12, whose ``.value`` setter is plain;
    flax >= 0.12 deprecates that setter for ``set_value``.
    """
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:  # pragma: no cover - depends on the flax
        variable.value = value
