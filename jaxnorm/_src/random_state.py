"""Imports that leave the user's global random states as they found them."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def global_random_state_kept() -> Iterator[None]:
    """Puts numpy's and Python's global random states back as they were, on exit.

    Importing jax draws from numpy's global random state (a module-level ``np.random`` call
    in jax's cluster detection). A user who seeds (``seed_everything(42)``), then imports
    jaxnorm or torch_compat, must get the numbers they would get without the import.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
