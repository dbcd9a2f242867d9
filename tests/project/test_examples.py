"""Each script in examples/ runs as a user runs it, and does what its docstring says.

A script runs in a fresh interpreter (one CPU device, as a user's machine) with every
warning turned into an error, as pytest's ``filterwarnings = error``, except the library
chatter the rest of the suite ignores too. The scripts assert their own results; the tests
also read what they print: every normalized score in [0, 1], every decision at 0.5 equal to
the decision at the raw threshold, and a detector that works on its synthetic data.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# (regex, category) ignored; everything else is an error. (Lightning's LeafSpec deprecation and
# its advice on loader workers are not here: the example must keep them from its users.)
LIBRARY_CHATTER = [
    # pyproject.toml's: lightning_utilities at pytorch-lightning 1.9's import (the floor).
    (r"`ModuleAvailableCache` is a special case of `RequirementCache`", "DeprecationWarning"),
    (r"Lightning couldn't infer the indices fetched for your dataloader", "UserWarning"),
    # A temporary directory of the floor's stack (torch 2.1, pytorch-lightning 1.9) that is
    # removed at exit; Python's default filters never show a ResourceWarning to a user.
    (r"Implicitly cleaning up <TemporaryDirectory", "ResourceWarning"),
]

_RUN = """
import builtins, runpy, sys, warnings
warnings.simplefilter("error")
for message, category in {chatter!r}:
    warnings.filterwarnings("ignore", message, getattr(builtins, category))
sys.argv = [{path!r}]
runpy.run_path({path!r}, run_name="__main__")
"""


def run_example(name: str) -> subprocess.CompletedProcess:
    path = str(EXAMPLES / name)
    env = dict(os.environ)
    # One CPU device, as on a user's machine (tests/conftest.py simulates 8 for the suite).
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _RUN.format(chatter=LIBRARY_CHATTER, path=path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def check_decisions(stdout: str, min_accuracy: float) -> None:
    agree, total = map(int, re.search(r"match the raw threshold: (\d+)/(\d+)", stdout).groups())
    assert total > 0 and agree == total, stdout
    hits, n = map(int, re.search(r"classified correctly at 0.5: (\d+)/(\d+)", stdout).groups())
    assert n == total and hits >= min_accuracy * n, stdout


@pytest.mark.slow
def test_flax_loop():
    stdout = run_example("flax_loop.py").stdout
    lo, hi = map(float, re.search(r"scores in \[([\d.]+), ([\d.]+)\]", stdout).groups())
    assert 0.0 <= lo <= hi <= 1.0, stdout
    assert stdout.count("epoch ") == 3, stdout  # validated through the hook every epoch
    check_decisions(stdout, min_accuracy=0.9)


@pytest.mark.slow
def test_fused_eval_step():
    stdout = run_example("fused_eval_step.py").stdout
    assert "fused and hook outputs agree; every score in [0, 1]" in stdout, stdout
    check_decisions(stdout, min_accuracy=0.8)


@pytest.mark.slow
def test_lightning_shim():
    pytest.importorskip("pytorch_lightning")
    proc = run_example("lightning_shim.py")
    assert "every predicted score in [0, 1], threshold at 0.5" in proc.stdout, proc.stdout
    check_decisions(proc.stdout, min_accuracy=0.9)
    # It prints only what it is about: no device banner, tip or deprecation from Lightning,
    # on pytorch-lightning 1.9 (the floor) as on 2.x.
    assert proc.stderr == "", proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [
        "statistics",
        "image threshold (raw)",
        "every predicted score in [0, 1], threshold at 0.5",
        "decisions at 0.5 that match the raw threshold",
        "test images classified correctly at 0.5",
    ], proc.stdout


def test_every_example_is_tested():
    tested = {"flax_loop.py", "fused_eval_step.py", "lightning_shim.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
