"""``make setup`` tells a new user what it is doing: one line per install step.

It runs for real, with ``PYTHON`` a stand-in whose ``-m venv`` makes a venv whose ``pip`` does
nothing, so that the test takes a second and needs no network.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# "python -m venv DIR": a venv whose pip records its arguments and installs nothing.
_FAKE_PYTHON = """#!/bin/sh
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "$@" >> "%s/pip.log"\\n' "$3" > "$3/bin/pip"
chmod +x "$3/bin/pip"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_setup_prints_one_line_per_install_step(tmp_path):
    python, venv = tmp_path / "python", tmp_path / "venv"
    python.write_text(_FAKE_PYTHON)
    python.chmod(0o755)
    proc = subprocess.run(
        ["make", "--no-print-directory", "setup", f"PYTHON={python}", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installs = (venv / "pip.log").read_text().splitlines()
    assert len(installs) == 3 and all(line.startswith("install ") for line in installs)
    lines = proc.stdout.splitlines()
    # the venv, each pip install, then done; no raw command line among them
    assert [line.split(":")[0] for line in lines] == [
        *(f"setup {i}/4" for i in range(1, 5)),
        "setup",
    ], proc.stdout
    assert not [line for line in lines if "pip install" in line or "-m venv" in line]
    assert (venv / ".installed").is_file()
