"""The machine and software a run measured, and the devices its contenders use."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Any

import jax


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def jax_device() -> jax.Device:
    """The device jaxnorm runs on: jax's default."""
    return jax.devices()[0]


# Names the machine instead of its hardware: results land under this name, e.g. to keep two
# runs of one machine apart, or to check that nothing depends on which machine runs the tests.
MACHINE_ENV = "JAXNORM_BENCH_MACHINE"


def machine_name() -> str:
    """A file-name-safe label: ``cpu-<model>-<n>c`` or ``gpu-<device kind>``.

    ``$JAXNORM_BENCH_MACHINE``, when set, is used instead (made file-name-safe).
    """
    if os.environ.get(MACHINE_ENV):
        return _slug(os.environ[MACHINE_ENV])
    dev = jax_device()
    if dev.platform == "cpu":
        return f"cpu-{_slug(cpu_model())}-{cpu_count()}c"
    return f"{dev.platform}-{_slug(dev.device_kind)}"


@functools.cache
def torch_device() -> str:
    """Where the torch baselines run: ``"cuda"`` when jax is on a GPU and torch sees one."""
    import torch

    if jax_device().platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def commit() -> str | None:
    """The checkout's commit (``-dirty`` when files differ from it), or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe() -> dict[str, Any]:
    """Versions, devices and date of this run, for the JSON and the README."""
    import numpy as np
    import torch

    dev = jax_device()
    info: dict[str, Any] = {
        "machine": machine_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "jax_backend": dev.platform,
        "jax_device": dev.device_kind,
        "torch_device": torch_device(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_count(),
    }
    code = commit()
    if code:  # which code the figures measured
        info["commit"] = code
    try:  # from the metadata: importing Lightning costs seconds
        info["pytorch_lightning"] = importlib.metadata.version("pytorch_lightning")
    except importlib.metadata.PackageNotFoundError:
        pass
    if torch_device() == "cuda":
        info["torch_cuda_device"] = torch.cuda.get_device_name()
    return info
