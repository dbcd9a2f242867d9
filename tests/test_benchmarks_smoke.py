"""The benchmark command runs end to end (``--quick``); no timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_runs_every_case(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run it
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-readme", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("*-quick.json")
    cases = json.loads(result.read_text())["cases"]
    assert {c["key"] for c in cases} == {"normalize", "minmax", "shim", "ragged", "memory"}
    for case in cases:
        assert not case["error"] and not case["skipped"], case["key"]
        assert case["rows"], case["key"]
    # the outputs were checked equal to the baselines before timing
    notes = " ".join(n for c in cases for n in c["notes"])
    assert "DISAGREE" not in notes and "agree" in notes
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().startswith("## Benchmarks")
