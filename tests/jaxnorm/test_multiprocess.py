"""Statistics across JAX processes: 2 real processes on this machine (jax.distributed, gloo).

Each process validates a different shard through ``MinMaxNormalizationHook`` (default
``reducer="auto"``); the parent compares what they wrote against a numpy reference over all
the data, computed as if one process had seen everything. Workers: tests/workers/.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import jaxnorm
import jaxnorm.distributed
from jaxnorm._src.distributed import _check, _pack, _reduce_rows
from jaxnorm.distributed import allreduce_across_processes
from tests import f1_reference, reference
from tests.workers import launch

pytestmark = pytest.mark.timeout(240)

N_PROCESSES = 2
GROUP_TIMEOUT = 120  # seconds for the whole group; a hang fails the test, never the session
IMAGE_THRESHOLD, PIXEL_THRESHOLD = 0.7, 1.3
# Counters each process sums (beyond 2**31, without x64).
COUNTS = [[2**40 + 1, 2**31 - 1, 0], [2**33 + 5, 2**31 + 7, 3]]


def batch(rng, n, lo, hi):
    return {
        "anomaly_maps": rng.uniform(lo, hi, (n, 1, 6, 6)).astype(np.float32),
        "pred_scores": rng.uniform(2 * lo, 2 * hi, (n,)).astype(np.float32),
        "box_scores": [rng.uniform(lo, hi, (k,)).astype(np.float32) for k in (0, 3)[: n % 3]]
        + [rng.uniform(lo, hi, (2,)).astype(np.float32)],
        "label": np.arange(n),
    }


def shards(rng, batch_size=4):
    """Two shards, each a sanity-check epoch with wild extremes then a real epoch.

    The global minimum of the real epoch is on process 0 and the maximum on process 1, so
    neither process alone has the global statistics.
    """
    out = []
    for pid, (lo, hi) in enumerate([(-2.0, 1.0), (0.0, 3.0)]):
        sanity = [batch(rng, batch_size, -1e3, 1e3)]
        real = [batch(rng, batch_size, lo, hi) for _ in range(3)]
        if pid == 0:
            real[1]["anomaly_maps"][2, 0, 1, 4] = -7.5
            real[2]["pred_scores"][1] = -11.0
        else:
            real[0]["anomaly_maps"][0, 0, 5, 5] = 9.25
            real[2]["pred_scores"][3] = 13.5
        out.append([sanity, real])
    return out


def expected_stats(all_shards, mode):
    """numpy: the min/max over the last epoch of every shard, finite values only."""

    def mm(values):
        v = np.concatenate([np.asarray(x, np.float64).ravel() for x in values])
        v = v[np.isfinite(v)]
        return (v.min(), v.max()) if v.size else (np.inf, -np.inf)

    last = [b for shard in all_shards if shard for b in shard[-1]]
    if mode == "shared":
        s = mm([reference.stats_source(b) for b in last])
        return {"image": s, "pixel": s}
    return {
        "image": mm([b["pred_scores"] for b in last]),
        "pixel": mm([b["anomaly_maps"] for b in last]),
    }


def expected_outputs(test_batches, stats):
    out = {}
    for b, batch in enumerate(test_batches):
        img, pix = stats["image"], stats["pixel"]
        out[f"{b}/pred_scores"] = reference.normalize(batch["pred_scores"], IMAGE_THRESHOLD, *img)
        out[f"{b}/anomaly_maps"] = reference.normalize(batch["anomaly_maps"], PIXEL_THRESHOLD, *pix)
        for j, box in enumerate(batch["box_scores"]):
            out[f"{b}/box_scores/{j}"] = reference.normalize(box, PIXEL_THRESHOLD, *pix)
    return out


def run_processes(tmp_path, all_shards, test_batches, *, devices_per_process=1, **config):
    cfg = {
        "image_threshold": IMAGE_THRESHOLD,
        "pixel_threshold": PIXEL_THRESHOLD,
        "stats": "shared",
        "nonfinite": "raise",
        "no_reduce": False,
        **config,
    }
    with open(tmp_path / "inputs.pkl", "wb") as f:
        pickle.dump(
            {"config": cfg, "shards": all_shards, "test": test_batches, "counts": COUNTS}, f
        )
    env = launch.child_env()
    if devices_per_process != 1:
        env = launch.child_env(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}"
        )
    script = str(launch.REPO / "tests" / "workers" / "jax_process.py")
    finished = launch.run_group(
        lambda port: [
            ([script, str(port), str(N_PROCESSES), str(i), str(tmp_path)], env)
            for i in range(N_PROCESSES)
        ],
        tmp_path / "logs",
        GROUP_TIMEOUT,
    )
    assert finished.returncodes == [0] * N_PROCESSES, finished.report()
    results, outputs = [], []
    for i in range(N_PROCESSES):
        with open(tmp_path / f"result{i}.json") as f:
            results.append(json.load(f))
        with np.load(tmp_path / f"outputs{i}.npz") as z:
            outputs.append(dict(z))
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"]) == (i, N_PROCESSES)
        assert r["local_device_count"] == devices_per_process
        assert r["device_count"] == devices_per_process * N_PROCESSES
    return results, outputs


# --- the reduction itself, in this process (no second process needed) ------------------


def test_one_process_returns_its_own_stats():
    mins, maxs, counts = allreduce_across_processes(
        [1.5, np.inf], np.array([2.5, -np.inf]), np.array([2**40, 3])
    )
    assert mins.dtype == maxs.dtype == np.float32 and counts.dtype == np.int64
    assert mins.tolist() == [1.5, np.inf] and maxs.tolist() == [2.5, -np.inf]
    assert counts.tolist() == [2**40, 3]
    s = jaxnorm.MinMax.empty().update(np.array([-1.0, 4.0]))
    assert _tuple(jaxnorm.distributed.reduce_stats(s)) == (-1.0, 4.0)
    both = jaxnorm.distributed.reduce_stats(jaxnorm.NormalizationStats(s, jaxnorm.MinMax.empty()))
    assert _tuple(both.image) == (-1.0, 4.0) and _tuple(both.pixel) == (np.inf, -np.inf)


def test_packed_rows_reduce_to_min_max_and_exact_sums():
    """What every process computes from the gathered rows: counts exact beyond 2**31."""
    rng = np.random.default_rng(3)
    n, k = 5, 2
    mins = rng.normal(size=(n, k)).astype(np.float32)
    maxs = mins + 1
    mins[2] = np.inf  # a process that saw nothing: the identity
    maxs[2] = -np.inf
    counts = np.array(
        [[2**62 - 1, 0, -(2**40)], [2**31, 1, 7], [0, 0, 0], [2**31 - 1, 2**33, -1], [5, 3, 2]],
        np.int64,
    )
    rows = np.stack([_pack(*_check(mins[i], maxs[i], counts[i])) for i in range(n)])
    assert rows.dtype == np.int32
    lo, hi, total = _reduce_rows(rows, k, counts.shape[1])
    np.testing.assert_array_equal(lo, mins.min(axis=0))
    np.testing.assert_array_equal(hi, maxs.max(axis=0))
    assert total.tolist() == [sum(int(c) for c in col) for col in counts.T]
    # all empty stays empty
    empty = _pack(*_check([np.inf], [-np.inf], [0]))
    lo, hi, total = _reduce_rows(np.stack([empty, empty]), 1, 1)
    assert (lo.tolist(), hi.tolist(), total.tolist()) == ([np.inf], [-np.inf], [0])
    with pytest.raises(OverflowError, match="does not fit in int64"):
        big = _pack(*_check([0.0], [0.0], [2**62 - 1]))
        _reduce_rows(np.stack([big] * 3), 1, 1)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="mins has shape"):
        allreduce_across_processes(np.zeros(2), np.zeros(3), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="counts: expected integers"):
        allreduce_across_processes(np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="beyond"):
        allreduce_across_processes(np.zeros(1), np.zeros(1), np.array([2**62]))
    stacked = jaxnorm.MinMax(min=np.zeros(3, np.float32), max=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"reduce\(\) first"):
        jaxnorm.distributed.reduce_stats(stacked)
    with pytest.raises(ValueError, match="expected NormalizationStats or MinMax"):
        jaxnorm.distributed.reduce_stats((0.0, 1.0))


def _tuple(s):
    return float(s.min), float(s.max)


# --- two processes ------------------------------------------------------------------------


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return shards(rng), [batch(rng, 4, -3.0, 12.0) for _ in range(2)]


def as_tuples(stats):
    return {k: tuple(v) for k, v in stats.items()}


def assert_same_as_one_process(results, outputs, all_shards, test_batches, mode):
    want = expected_stats(all_shards, mode)
    for r in results:
        assert as_tuples(r["host_stats"]) == want
        assert as_tuples(r["reduce_stats"]) == want  # the functional path agrees
        assert r["errors"] == []
    ref = expected_outputs(test_batches, want)
    for out in outputs:
        for stage in ("test", "predict"):
            got = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(stage + "/")}
            assert got.keys() == ref.keys()
            for k in ref:
                np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6, err_msg=k)
    # Both processes normalize identically, bit for bit.
    assert outputs[0].keys() == outputs[1].keys()
    for k in outputs[0]:
        np.testing.assert_array_equal(outputs[0][k], outputs[1][k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, devices_per_process",
    [("shared", 1), ("separate", 1), ("shared", 2)],
    ids=["shared-1dev", "separate-1dev", "shared-2dev"],
)
def test_every_process_gets_the_global_stats(tmp_path, data, mode, devices_per_process):
    all_shards, test_batches = data
    results, outputs = run_processes(
        tmp_path, all_shards, test_batches, stats=mode, devices_per_process=devices_per_process
    )
    assert_same_as_one_process(results, outputs, all_shards, test_batches, mode)
    # Neither shard alone holds the global extremes (else the test would prove nothing).
    for shard in all_shards:
        assert expected_stats([shard], mode) != expected_stats(all_shards, mode)
    want_counts = [sum(c) for c in zip(*COUNTS, strict=True)]
    for r in results:
        assert r["count_sums"] == want_counts and not r["x64"]


@pytest.mark.slow
def test_process_without_validation_batches_neither_poisons_nor_hangs(tmp_path, data):
    all_shards, test_batches = data
    all_shards[1] = [[], []]  # process 1 runs both validation epochs without a batch
    results, outputs = run_processes(tmp_path, all_shards, test_batches)
    assert_same_as_one_process(results, outputs, all_shards, test_batches, "shared")
    assert np.isfinite(results[1]["host_stats"]["image"]).all()


@pytest.mark.slow
def test_nonfinite_raise_raises_on_every_process(tmp_path, data):
    all_shards, test_batches = data
    all_shards[1][-1][1]["anomaly_maps"][0, 0, :3, 0] = np.nan  # process 1 only, real epoch
    results, _ = run_processes(tmp_path, all_shards, test_batches, nonfinite="raise")
    # Same count on both; only the process that saw the NaN can name the key.
    keys = ["validation outputs", "anomaly_maps"]
    for r, key in zip(results, keys, strict=True):
        assert [(e["epoch"], e["key"], e["count"]) for e in r["errors"]] == [(1, key, 3)], r[
            "errors"
        ]
        assert "summed over all processes" in r["errors"][0]["msg"]


@pytest.mark.slow
def test_nonfinite_omit_gives_the_finite_global_stats(tmp_path, data):
    all_shards, test_batches = data
    maps = all_shards[1][-1][1]["anomaly_maps"]
    maps[0, 0, :3, 0] = np.nan
    maps[1, 0, 0, 0] = np.inf
    maps[2, 0, 0, 0] = -np.inf
    results, outputs = run_processes(tmp_path, all_shards, test_batches, nonfinite="omit")
    assert_same_as_one_process(results, outputs, all_shards, test_batches, "shared")
    assert np.isfinite(results[0]["host_stats"]["pixel"]).all()


@pytest.mark.slow
def test_negative_control_without_reduction_each_process_keeps_its_own_stats(tmp_path, data):
    """With ``reducer=None`` the processes disagree: the tests above see the reduction."""
    all_shards, test_batches = data
    results, outputs = run_processes(tmp_path, all_shards, test_batches, no_reduce=True)
    global_stats = expected_stats(all_shards, "shared")
    for i, r in enumerate(results):
        assert as_tuples(r["host_stats"]) == expected_stats([all_shards[i]], "shared")
        assert as_tuples(r["host_stats"]) != global_stats
    assert any(not np.array_equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def f1_batch(rng, n, shift):
    """A batch with labels and masks: anomalous images and pixels score higher."""
    label = np.arange(n) % 2
    mask = rng.random((n, 6, 6)) < 0.2
    maps = (rng.normal(size=(n, 1, 6, 6)) + shift + 1.5 * mask[:, None]).astype(np.float32)
    return {
        "anomaly_maps": maps,
        "pred_scores": maps.reshape(n, -1).max(axis=1) + 0.5 * label,
        "label": label,
        "mask": mask,
    }


def f1_thresholds(batches):
    cat = {k: np.concatenate([np.ravel(b[k]) for b in batches]) for k in batches[0]}
    image = f1_reference.f1_threshold(cat["pred_scores"], cat["label"])
    return [float(image), float(f1_reference.f1_threshold(cat["anomaly_maps"], cat["mask"]))]


@pytest.mark.slow
def test_f1_thresholds_are_those_of_every_processs_data(tmp_path):
    """``thresholds="f1"``: every process sets the thresholds of the union, as one process
    would, also in an epoch where one process validates nothing (it still takes part in
    every collective)."""
    rng = np.random.default_rng(11)
    shards = [
        [[f1_batch(rng, 4, 0.0) for _ in range(2)], [f1_batch(rng, 4, 0.0) for _ in range(3)]],
        [[], [f1_batch(rng, 4, 1.0) for _ in range(2)]],
    ]
    results, _ = run_processes(tmp_path, shards, [f1_batch(rng, 4, 0.0)], thresholds="f1")
    first = f1_thresholds(shards[0][0])
    union = f1_thresholds(shards[0][1] + shards[1][1])
    for r in results:
        assert r["errors"] == []
        assert r["thresholds"] == [first, union]
    # the negative control: neither process's own data gives the union's thresholds
    assert f1_thresholds(shards[0][1]) != union != f1_thresholds(shards[1][1])


def test_launcher_kills_a_hung_group_and_its_children(tmp_path):
    """The guard every test above relies on: a hang ends in a failure, not a stuck session."""
    import time

    hang = (
        "import os, subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        f"open(os.path.join({str(tmp_path)!r}, f'pids{{os.getpid()}}'), 'w')"
        ".write(f'{os.getpid()} {child.pid}');"
        "time.sleep(600)"
    )
    start = time.monotonic()
    with pytest.raises(launch.GroupTimeout, match="still running after 6 s"):
        launch.run_group(
            lambda port: [(["-c", hang], launch.child_env())] * 2, tmp_path / "logs", timeout=6
        )
    assert time.monotonic() - start < 30
    pids = [int(p) for f in tmp_path.glob("pids*") for p in f.read_text().split()]
    assert len(pids) == 4
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
