"""Lightning DDP (2 ranks, gloo, CPU) with ``torch_compat.MinMaxNormalizationCallback``.

A real ``Trainer(strategy="ddp", accelerator="cpu", devices=2)``: the test launches one
process per rank with torchrun's variables (tests/workers/ddp_rank.py), each rank validates
its own data, and the parent checks every rank against a numpy reference over all of it.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from tests import reference
from tests.workers import launch

pytest.importorskip("pytorch_lightning")
pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORLD_SIZE = 2
GROUP_TIMEOUT = 120  # seconds for the whole group
COLLECTIVE_TIMEOUT = 60  # torch.distributed's own timeout, so a stuck collective errors out
IMAGE_THRESHOLD, PIXEL_THRESHOLD = 0.7, 1.3


def batch(rng, n, lo, hi):
    return {
        "anomaly_maps": rng.uniform(lo, hi, (n, 1, 5, 5)).astype(np.float32),
        "pred_scores": rng.uniform(lo, hi, (n,)).astype(np.float32),
        "box_scores": [rng.uniform(lo, hi, (k,)).astype(np.float32) for k in (2, 0, 3)[:n]],
    }


@pytest.fixture
def data():
    """Validation data per rank, the global min on rank 0 and the max on rank 1; test data."""
    rng = np.random.default_rng(11)
    val = [
        [batch(rng, 3, -1.0, 1.0) for _ in range(3)],
        [batch(rng, 3, 0.0, 2.0) for _ in range(2)],
    ]
    val[0][2]["anomaly_maps"][1, 0, 4, 0] = -6.5
    val[1][1]["anomaly_maps"][0, 0, 2, 2] = 8.75
    test = [batch(rng, 3, -8.0, 10.0) for _ in range(2)]
    return val, test


def global_stats(val):
    return reference.min_max(*[reference.stats_source(b) for rank in val for b in rank])


def run_ranks(tmp_path, val, test, **config):
    cfg = {
        "image_threshold": IMAGE_THRESHOLD,
        "pixel_threshold": PIXEL_THRESHOLD,
        "nonfinite": "raise",
        "no_reduce": False,
        "timeout": COLLECTIVE_TIMEOUT,
        **config,
    }
    with open(tmp_path / "inputs.pkl", "wb") as f:
        pickle.dump({"config": cfg, "val": val, "test": test, "world_size": WORLD_SIZE}, f)
    script = str(launch.REPO / "tests" / "workers" / "ddp_rank.py")

    commands = launch.ddp_commands(
        script,
        [str(tmp_path)],
        WORLD_SIZE,
        # Lightning < 2.4 (anomalib 0.x's) loads checkpoints without weights_only, which
        # torch >= 2.6 makes True and refuses Lightning's own checkpoints.
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
    )

    finished = launch.run_group(commands, tmp_path / "logs", GROUP_TIMEOUT)
    assert finished.returncodes == [0] * WORLD_SIZE, finished.report()
    results, outputs = [], []
    for rank in range(WORLD_SIZE):
        with open(tmp_path / f"rank{rank}.json") as f:
            results.append(json.load(f))
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            outputs.append(dict(z))
        assert (results[rank]["global_rank"], results[rank]["world_size"]) == (rank, WORLD_SIZE)
    return results, outputs


def test_ddp_ranks_share_global_stats_in_memory_and_in_the_checkpoint(tmp_path, data):
    torch = pytest.importorskip("torch")
    val, test = data
    results, outputs = run_ranks(tmp_path, val, test)
    lo, hi = global_stats(val)
    want = {"image": [lo, hi], "pixel": [lo, hi]}
    for rank, r in enumerate(results):
        assert r["errors"] == []
        # every validation epoch (sanity check included) ends with the same, global stats
        sanity, real = r["epochs"]
        assert sanity["sanity"] and not real["sanity"]
        assert real["metrics"] == real["hook"] == want, rank
        first = [v[0] for v in val]  # the sanity check ran one batch per rank
        s = global_stats([first])
        assert sanity["metrics"] == {"image": list(s), "pixel": list(s)}
        assert r["restored"] == want  # predict restored them from the checkpoint
        assert r["image_metrics_threshold"] == 0.5
    assert results[0]["checkpoint"] == results[1]["checkpoint"]
    ckpt = torch.load(results[0]["checkpoint"], map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert (
        float(state["normalization_metrics.min"]),
        float(state["normalization_metrics.max"]),
    ) == (
        lo,
        hi,
    )

    # test and predict: what one process with all the data would give
    for out in outputs:
        for stage in ("test", "predict"):
            for b, tb in enumerate(test):
                ref = reference.normalize_batch(tb, IMAGE_THRESHOLD, PIXEL_THRESHOLD, lo, hi)
                for key in ("pred_scores", "anomaly_maps"):
                    np.testing.assert_allclose(
                        out[f"{stage}/{b}/{key}"], ref[key], atol=1e-6, err_msg=(stage, b, key)
                    )
                for j, box in enumerate(ref["box_scores"]):
                    np.testing.assert_allclose(out[f"{stage}/{b}/box_scores/{j}"], box, atol=1e-6)
    assert outputs[0].keys() == outputs[1].keys()
    for k in outputs[0]:
        np.testing.assert_array_equal(outputs[0][k], outputs[1][k], err_msg=k)


def test_ddp_nan_on_one_rank_raises_on_every_rank(tmp_path, data):
    val, test = data
    val[1][1]["anomaly_maps"][2, 0, 0, :4] = np.nan  # rank 1 only, after the sanity check
    results, _ = run_ranks(tmp_path, val, test, nonfinite="raise")
    for r in results:
        assert [e["count"] for e in r["errors"]] == [4], r["errors"]
        assert "summed over all processes" in r["errors"][0]["msg"]


def test_ddp_nan_omitted_gives_the_finite_global_stats(tmp_path, data):
    val, test = data
    val[1][1]["anomaly_maps"][2, 0, 0, :4] = np.nan
    lo, hi = global_stats(val)  # reference.min_max propagates NaN: compute on finite values
    finite = np.concatenate([reference.stats_source(b) for rank in val for b in rank])
    finite = finite[np.isfinite(finite)]
    results, _ = run_ranks(tmp_path, val, test, nonfinite="omit")
    for r in results:
        assert r["errors"] == []
        assert r["epochs"][-1]["metrics"]["pixel"] == [finite.min(), finite.max()]


def test_ddp_rank_without_scores_neither_poisons_nor_hangs(tmp_path, data):
    """Rank 1's batches hold no image at all: its empty statistics are the identity.

    (A rank whose validation DataLoader is empty never gets this far: Lightning itself
    raises on every rank before the loop starts.)
    """
    val, test = data
    rng = np.random.default_rng(5)
    val[1] = [batch(rng, 0, 0.0, 1.0) for _ in range(2)]
    results, outputs = run_ranks(tmp_path, val, test)
    lo, hi = global_stats(val[:1])
    for r in results:
        assert r["epochs"][-1]["metrics"]["pixel"] == [lo, hi]
        assert r["restored"]["pixel"] == [lo, hi]
    ref = reference.normalize(test[0]["anomaly_maps"], PIXEL_THRESHOLD, lo, hi)
    for out in outputs:
        np.testing.assert_allclose(out["test/0/anomaly_maps"], ref, atol=1e-6)


def test_ddp_negative_control_without_reduction_ranks_disagree(tmp_path, data):
    """With the reduction switched off each rank keeps its own stats: the test above sees it."""
    val, test = data
    results, outputs = run_ranks(tmp_path, val, test, no_reduce=True)
    for rank, r in enumerate(results):
        own = global_stats([val[rank]])
        assert r["epochs"][-1]["metrics"]["pixel"] == list(own) != list(global_stats(val))
    # At test time DDP's buffer broadcast hands every rank rank 0's local stats (and the
    # checkpoint holds them): consistent across ranks, but not the global normalization.
    for r in results:
        assert r["restored"]["pixel"] == list(global_stats([val[0]]))
    lo, hi = global_stats(val)
    for out in outputs:
        ref = reference.normalize(test[0]["anomaly_maps"], PIXEL_THRESHOLD, lo, hi)
        assert not np.allclose(out["test/0/anomaly_maps"], ref, atol=1e-6)
