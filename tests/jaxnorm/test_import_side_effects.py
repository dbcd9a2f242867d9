"""Importing jaxnorm or torch_compat leaves the user's global random states as it found them.

A user seeds (``seed_everything(42)``: numpy and Python's ``random``), then imports the
library; the numbers drawn afterwards must be the ones drawn without the import. Each case
runs in a fresh interpreter, where jax has not been imported yet.
"""

import json
import subprocess
import sys

import pytest

from tests import compat

_DRAW = """
import json, random, sys
import numpy as np
np.random.seed(42)
random.seed(42)
{import_line}
print(json.dumps({{"np": np.random.rand(4).tolist(), "py": [random.random() for _ in range(4)]}}))
"""


def _draws(import_line: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _DRAW.format(import_line=import_line)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def untouched() -> dict:
    return _draws("pass")


def test_negative_control_plain_jax_import_moves_numpy_state(untouched):
    # The hazard the guard exists for: if this stops failing, jax no longer draws at import
    # and the guard tests below would pass vacuously.
    if not compat.jax_import_draws_from_numpy():
        pytest.skip("this jax's import does not draw from numpy (jax 0.6.0 does not)")
    assert _draws("import jax")["np"] != untouched["np"]


@pytest.mark.parametrize(
    "import_line",
    [
        "import jaxnorm",
        "import torch_compat",
        "from torch_compat import MinMaxNormalizationCallback",
        "import jaxnorm.nnx, jaxnorm.distributed, jaxnorm.testing",
    ],
)
def test_import_keeps_global_random_state(untouched, import_line):
    assert _draws(import_line) == untouched
