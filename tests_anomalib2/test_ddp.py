"""Lightning DDP (2 ranks, gloo, CPU): the statistics and the F1 thresholds are reduced across
ranks, as anomalib 2's metric sync reduces them.

Each rank validates its own batches, the global minimum on rank 0 and the maximum on rank 1;
every rank must end with the statistics and thresholds of all the data, equal to anomalib's
PostProcessor under the same DDP run (its torchmetrics sync, which gathers every score) and
to numpy over everything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import f1_reference
from tests.workers import launch

WORLD_SIZE = 2
GROUP_TIMEOUT = 240
COLLECTIVE_TIMEOUT = 60
WORKER = Path(__file__).parent / "workers" / "ddp_rank.py"


def batch(rng, lo, hi, n=4, size=6):
    return {
        "pred_score": rng.uniform(lo, hi, n).astype(np.float32),
        "anomaly_map": rng.uniform(lo, hi, (n, size, size)).astype(np.float32),
        "gt_label": np.arange(n) % 2,
        "gt_mask": rng.uniform(0, 1, (n, size, size)) > 0.7,
    }


@pytest.fixture
def val():
    rng = np.random.default_rng(3)
    val = [[batch(rng, -1.0, 1.0) for _ in range(3)], [batch(rng, 0.0, 2.0) for _ in range(2)]]
    val[0][1]["pred_score"][2] = -7.5  # global image min, rank 0
    val[1][0]["anomaly_map"][1, 2, 3] = 9.25  # global pixel max, rank 1
    for b in val[1]:  # rank 1 alone has other thresholds: its anomalies score higher
        b["gt_mask"] = b["anomaly_map"] > 1.5
        b["pred_score"][b["gt_label"] == 1] += 1.0
    return val


def run_ranks(tmp_path, val):
    inputs = {"val": val, "world_size": WORLD_SIZE, "timeout": COLLECTIVE_TIMEOUT}
    results = launch.run_ddp_workers(WORKER, tmp_path, inputs, WORLD_SIZE, GROUP_TIMEOUT)
    assert [r["world_size"] for r in results] == [WORLD_SIZE] * WORLD_SIZE
    return results


def stats(batches, field):
    values = np.concatenate([b[field].ravel() for b in batches])
    return float(values.min()), float(values.max())


def thresholds(batches):
    """anomalib 2.7's image and pixel thresholds over ``batches`` (numpy, SPEC.md)."""
    cat = {k: np.concatenate([b[k].ravel() for b in batches]) for k in batches[0]}
    image = f1_reference.f1_threshold(cat["pred_score"], cat["gt_label"])
    return float(image), float(f1_reference.f1_threshold(cat["anomaly_map"], cat["gt_mask"]))


@pytest.mark.timeout(400)
def test_every_rank_ends_with_the_global_statistics_as_anomalibs_sync(tmp_path, val):
    results = run_ranks(tmp_path, val)
    everything = val[0] + val[1]
    image, pixel = stats(everything, "pred_score"), stats(everything, "anomaly_map")
    # the negative control: each rank's own statistics are not the global ones
    assert stats(val[0], "pred_score") != image and stats(val[1], "anomaly_map") != pixel
    for r in results:
        assert "jaxnorm_error" not in r and "anomalib_error" not in r
        ours, theirs = r["jaxnorm"], r["anomalib"]
        assert (ours["image_min"], ours["image_max"]) == image
        assert (ours["pixel_min"], ours["pixel_max"]) == pixel
        assert ours == theirs  # thresholds too: jaxnorm's F1 against anomalib's metric
        assert (ours["_image_threshold"], ours["_pixel_threshold"]) == thresholds(everything)
        assert r["jaxnorm_metric_updates"] == 0 and r["anomalib_metric_updates"] > 0
    assert results[0]["jaxnorm"] == results[1]["jaxnorm"]
    # the negative control: neither rank's own data gives the global thresholds
    assert thresholds(val[0]) != thresholds(everything) != thresholds(val[1])


@pytest.mark.timeout(400)
def test_nonfinite_scores_on_one_rank_raise_on_every_rank(tmp_path, val):
    val[1][1]["anomaly_map"][0, 0, :3] = np.nan  # rank 1 only
    results = run_ranks(tmp_path, val)
    clean = val[0] + val[1][:1]
    for rank, r in enumerate(results):
        assert "anomalib_error" not in r  # anomalib stores whatever NaN the sync makes of it
        error = r["jaxnorm_error"]
        # only the rank that saw the values can name the field; the count is summed
        key = "anomaly_map" if rank == 1 else "validation outputs"
        assert (error["key"], error["count"]) == (key, 3), error
        assert "summed over all processes" in error["msg"]
        named = "'batch.anomaly_map'" if rank == 1 else "'validation outputs'"
        assert named in error["msg"], error["msg"]
        # the clean batches of every rank are in the statistics
        assert (r["jaxnorm"]["pixel_min"], r["jaxnorm"]["pixel_max"]) == stats(clean, "anomaly_map")
