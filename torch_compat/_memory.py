"""GPU memory beside torch: keep XLA from preallocating most of the GPU at its first use.

jax's GPU client reserves 75% of the GPU's memory when it starts, unless
``XLA_PYTHON_CLIENT_PREALLOCATE=false``; beside a torch model that leaves torch short of
memory. The variable is read when jax creates its GPU client (jaxlib's ``xla_client``), not
when jax is imported, so setting it at ``import torch_compat`` works as long as jax has run
nothing yet.
"""

from __future__ import annotations

import os
import warnings

PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


class PreallocationWarning(UserWarning):
    """jax started its GPU backend with XLA's preallocation before torch_compat was imported."""


def disable_preallocation() -> bool:
    """Sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set; returns whether the user set it."""
    if PREALLOCATE in os.environ:
        return True
    os.environ[PREALLOCATE] = "false"
    return False


def _backends_initialized() -> bool:
    # Asked without starting a backend. backends_are_initialized exists in every jax we
    # support; the private dict is the fallback.
    from jax._src import xla_bridge

    check = getattr(xla_bridge, "backends_are_initialized", None)
    if check is not None:
        return bool(check())
    return bool(getattr(xla_bridge, "_backends", None))


def warn_if_preallocated(user_set: bool) -> None:
    """Warns when jax's accelerator backend already started with preallocation on."""
    if user_set or not _backends_initialized():
        return
    import jax

    platform = jax.default_backend()  # backends are up: this starts nothing
    if platform == "cpu":
        return  # preallocation is a GPU allocator setting
    warnings.warn(
        f"torch_compat: jax's '{platform}' backend was started before torch_compat was "
        f"imported, with XLA's default preallocation ({PREALLOCATE} unset), so jax holds most "
        "of the accelerator's memory beside torch's model. Import torch_compat before running "
        f"anything in jax, or set {PREALLOCATE}=false (or .platform / a memory fraction) in "
        "the environment before starting Python.",
        PreallocationWarning,
        stacklevel=3,
    )
