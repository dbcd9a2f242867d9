"""``import torch_compat`` turns XLA's GPU preallocation off, in fresh interpreters on CPU.

jax reads ``XLA_PYTHON_CLIENT_PREALLOCATE`` when it creates its GPU client (jaxlib's
``xla_client``), so the variable set at import time takes effect as long as jax has started
no backend. When a GPU backend is already up, the import can only warn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_VAR = "XLA_PYTHON_CLIENT_PREALLOCATE"

_SCRIPT = """
import json, os, warnings
warnings.simplefilter("always")
{before}
with warnings.catch_warnings(record=True) as caught:
    import torch_compat
print(json.dumps({{
    "value": os.environ.get("{var}"),
    "warnings": [
        type(w.message).__name__ + ": " + str(w.message)
        for w in caught
        if issubclass(w.category, torch_compat.PreallocationWarning)
    ],
}}))
"""


def _run(before: str = "", **env_overrides: str | None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.pop(_VAR, None)
    for key, value in env_overrides.items():
        if value is not None:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(before=before, var=_VAR)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unset_variable_is_set_to_false():
    assert _run() == {"value": "false", "warnings": []}


@pytest.mark.parametrize("value", ["true", "false", ".platform"])
def test_the_users_value_is_kept(value):
    assert _run(**{_VAR: value}) == {"value": value, "warnings": []}


def test_jax_imported_but_not_started_is_still_in_time():
    assert _run("import jax") == {"value": "false", "warnings": []}


# A GPU backend cannot start on this CPU machine: jax's CPU backend is started, and jax is
# told its default backend is a GPU, which is all the check asks once backends are up.
_GPU_STARTED = "import jax; jax.devices(); jax.default_backend = lambda: 'gpu'"


def test_gpu_backend_started_before_import_warns():
    out = _run(_GPU_STARTED)
    assert out["value"] == "false"
    assert len(out["warnings"]) == 1
    assert out["warnings"][0].startswith("PreallocationWarning: torch_compat: jax's 'gpu'")
    assert _VAR in out["warnings"][0]


def test_no_warning_when_the_started_backend_is_the_cpu_or_the_user_chose():
    assert _run("import jax; jax.devices()")["warnings"] == []
    assert _run(_GPU_STARTED, **{_VAR: "true"})["warnings"] == []
