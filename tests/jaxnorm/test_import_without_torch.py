"""``import torch_compat`` without the torch extra says what to install.

Each case runs in a fresh interpreter where an import hook makes the named modules look
uninstalled (as pip would leave them without ``jaxnorm[torch]``).
"""

import json
import os
import subprocess
import sys

import pytest

_HIDDEN = """
import importlib.util, json, os, sys

HIDDEN = {hidden!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name.split(".")[0] in HIDDEN else _find_spec(name, *a)
)
try:
    {statement}
except ImportError as error:
    result = {{"type": type(error).__name__, "message": str(error)}}
else:
    result = {{"type": None, "message": ""}}
result["preallocate"] = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
print(json.dumps(result))
"""


def _run(statement: str, hidden: tuple[str, ...]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    proc = subprocess.run(
        [sys.executable, "-c", _HIDDEN.format(hidden=hidden, statement=statement)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_negative_control_the_hook_hides_torch():
    assert _run("import torch", ("torch",))["type"] == "ModuleNotFoundError"


def test_jaxnorm_needs_no_torch():
    assert _run("import jaxnorm, jaxnorm.nnx", ("torch", "torchmetrics"))["type"] is None


@pytest.mark.parametrize("hidden", [("torch", "torchmetrics"), ("torchmetrics",), ("torch",)])
def test_torch_compat_without_the_extra_names_it(hidden):
    got = _run("import torch_compat", hidden)
    assert got["type"] == "ImportError", got  # not a bare ModuleNotFoundError
    assert 'pip install "jaxnorm[torch]"' in got["message"]
    # It names what is missing, and only that: with torch installed, torch is not named
    # missing ("needs PyTorch ('torchmetrics' is not installed)" misled).
    needs = got["message"].split(":")[0]
    assert needs == "torch_compat needs " + " and ".join(map(repr, hidden)), got
    assert ("(torch is)" in got["message"]) == ("torch" not in hidden)
    # the failed import leaves no XLA setting behind
    assert got["preallocate"] is None


def test_callback_without_lightning_names_the_extra():
    got = _run(
        "from torch_compat import MinMaxNormalizationCallback",
        ("pytorch_lightning", "lightning"),
    )
    assert got["type"] == "ImportError", got
    assert 'pip install "jaxnorm[torch]"' in got["message"]
