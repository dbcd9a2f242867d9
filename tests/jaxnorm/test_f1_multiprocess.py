"""F1AdaptiveThreshold.compute(reducer) across real processes: jax.distributed and torch DDP.

Each process folds its own shard; the threshold every process computes must be the one a
single process over all the data gives (tests/f1_reference.py). Workers:
tests/workers/f1_process.py.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from tests import f1_reference as ref
from tests.workers import launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N = 2
GROUP_TIMEOUT = 150


@pytest.fixture(scope="module")
def shards():
    """Two shards of anomaly maps; the distributions differ, so neither alone decides."""
    rng = np.random.default_rng(21)
    out = []
    for shift in (1.5, 2.5):
        batches = []
        for _ in range(3):
            masks = rng.random((4, 1, 32, 32)) < 0.1
            maps = (rng.normal(size=masks.shape) + shift * masks).astype(np.float32)
            batches.append((maps, masks))
        out.append(batches)
    out[1].append((np.full((2, 2), 9.0, np.float32), np.zeros((2, 2), bool)))  # a tie block
    return out


def run(tmp_path, backend, shards):
    with open(tmp_path / "inputs.pkl", "wb") as f:
        pickle.dump({"shards": shards}, f)
    script = str(launch.REPO / "tests" / "workers" / "f1_process.py")
    if backend == "jax":
        env = launch.child_env()

        def commands(port):
            return [
                ([script, "jax", str(tmp_path), str(port), str(N), str(i)], env) for i in range(N)
            ]

    else:
        pytest.importorskip("torch")
        commands = launch.ddp_commands(script, ["ddp", str(tmp_path)], N)
    finished = launch.run_group(commands, tmp_path / "logs", GROUP_TIMEOUT)
    assert finished.returncodes == [0] * N, finished.report()
    out = []
    for i in range(N):
        with open(tmp_path / f"result{i}.json") as f:
            out.append(json.load(f))
    return out


@pytest.mark.parametrize("backend", ["jax", "ddp"])
def test_every_process_gets_the_threshold_of_all_the_data(tmp_path, backend, shards):
    scores = np.concatenate([s.ravel() for shard in shards for s, _ in shard])
    labels = np.concatenate([m.ravel() for shard in shards for _, m in shard])
    want = int(np.float32(ref.f1_threshold(scores, labels)).view(np.uint32))
    thresholds, f1 = ref.f1_curve(scores, labels)
    results = run(tmp_path, backend, shards)
    for r in results:
        assert r["exact"]["bits"] == want
        assert r["exact"]["max_f1_lost"] == 0
        bounded = r["bounded"]
        value = np.uint32(bounded["bits"]).view(np.float32)
        at = np.flatnonzero(thresholds == value)
        assert at.size == 1 and f1.max() - f1[at[0]] <= bounded["max_f1_lost"]
        if bounded["max_f1_lost"] == 0:
            assert bounded["bits"] == want
    assert results[0] == results[1]
