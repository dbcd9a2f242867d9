"""The demo's optional dependencies (the ``demo`` extra), checked before training starts.

Without matplotlib the demo runs without its figure, and without tqdm without its progress
bar; it says so, and what to install, before it trains, so that no one waits through
training to find out.
"""

from __future__ import annotations

import dataclasses
import importlib

INSTALL = 'pip install "jaxnorm[demo]"'
INSTALL_CHECKOUT = 'pip install -e ".[demo]"'


def installed(module: str) -> bool:
    """Whether ``module`` imports."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Extras:
    """What the demo will draw, and what it goes without.

    Attributes:
      plot: the figure will be written.
      progress: the progress bar will show.
      missing: for each optional module that is not installed, the line saying so.
    """

    plot: bool
    progress: bool
    missing: tuple[str, ...]


def check(plot: bool, progress: bool) -> Extras:
    """Finds the modules the figure and the progress bar need (when asked for).

    Args:
      plot: the figure is wanted (no ``--no-plot``).
      progress: the progress bar is wanted (no ``--no-progress``).
    """
    extras = Extras(
        plot=plot and installed("matplotlib"),
        progress=progress and installed("tqdm"),
        missing=(),
    )
    missing = tuple(
        f"{module} is not installed: the demo runs {without}. To get it: {INSTALL} "
        f"(in a checkout: {INSTALL_CHECKOUT})."
        for wanted, have, module, without in (
            (plot, extras.plot, "matplotlib", "without its figure (normalization.png)"),
            (progress, extras.progress, "tqdm", "without a progress bar"),
        )
        if wanted and not have
    )
    return dataclasses.replace(extras, missing=missing)
