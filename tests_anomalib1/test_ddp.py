"""Lightning DDP (2 ranks, gloo, CPU): torch_compat's callback ends each validation epoch with
the statistics of every rank's batches; anomalib 1.x's keeps each rank's own (its metrics are
never synced: anomalib #930, #2499), a difference listed in docs/anomalib1.md.

Each rank validates its own batches, with the global minimum of the image scores on rank 0
and the global maximum of the maps on rank 1.
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np
import pytest

from tests.workers import launch

WORLD_SIZE = 2
GROUP_TIMEOUT = 300
COLLECTIVE_TIMEOUT = 60
WORKER = Path(__file__).parent / "workers" / "ddp_rank.py"


def batch(rng, lo, hi, n=4, size=6):
    return {
        "pred_scores": rng.uniform(lo, hi, n).astype(np.float32),
        "anomaly_maps": rng.uniform(lo, hi, (n, 1, size, size)).astype(np.float32),
    }


@pytest.fixture
def val():
    rng = np.random.default_rng(3)
    val = [[batch(rng, -1.0, 1.0) for _ in range(3)], [batch(rng, 0.0, 2.0) for _ in range(2)]]
    val[0][1]["pred_scores"][2] = -7.5  # global image-score min, rank 0
    val[1][0]["anomaly_maps"][1, 0, 2, 3] = 9.25  # global map max, rank 1
    return val


def run_ranks(tmp_path, val):
    inputs = {"val": val, "world_size": WORLD_SIZE, "timeout": COLLECTIVE_TIMEOUT}
    results = launch.run_ddp_workers(WORKER, tmp_path, inputs, WORLD_SIZE, GROUP_TIMEOUT)
    assert [r["world_size"] for r in results] == [WORLD_SIZE] * WORLD_SIZE
    return results


def minmax(batches, *keys):
    values = np.concatenate([b[k].ravel() for b in batches for k in keys])
    return [float(values.min()), float(values.max())]


def expected(batches):
    """The statistics anomalib's design computes from ``batches`` (numpy, SPEC §9)."""
    if common.expected_design() == "per-output":
        return {
            "anomaly_maps": minmax(batches, "anomaly_maps"),
            "box_scores": [float("inf"), float("-inf")],
            "pred_scores": minmax(batches, "pred_scores"),
        }
    return {"": minmax(batches, "anomaly_maps")}  # the first present of maps, boxes, scores


@pytest.mark.timeout(500)
def test_every_rank_ends_with_the_statistics_of_all_ranks(tmp_path, val):
    results = run_ranks(tmp_path, val)
    everything = expected(val[0] + val[1])
    for rank, r in enumerate(results):
        assert "jaxnorm_error" not in r and "anomalib_error" not in r
        assert r["jaxnorm"] == everything, rank
        # anomalib's: this rank's own batches only
        assert r["anomalib"] == expected(val[rank]) != everything, rank


@pytest.mark.timeout(500)
def test_nonfinite_scores_on_one_rank_raise_on_every_rank(tmp_path, val):
    val[1][1]["anomaly_maps"][0, 0, 0, :3] = np.nan  # rank 1 only
    results = run_ranks(tmp_path, val)
    for rank, r in enumerate(results):
        error = r["jaxnorm_error"]
        key = "anomaly_maps" if rank == 1 else "validation outputs"
        assert (error["key"], error["count"]) == (key, 3), error
        assert "summed over all processes" in error["msg"]
