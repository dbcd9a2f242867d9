"""torch_compat/_allreduce.py: statistics all-reduced over a gloo group (CPU), the reducer's
combination of ranks, and the callback's epoch end under DDP, driven by hand.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

import jaxnorm
import jaxnorm.testing
import torch_compat
import torch_compat._allreduce
import torch_compat._callback
import torch_compat._change
from tests import reference
from tests.torch_compat.module_protocol import (
    fitted,
    make_outputs,
    to_numpy,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_allreduce_stats_over_a_gloo_group(gloo_group):
    mins = np.array([0.5, -2.0], np.float32)
    maxs = np.array([3.0, np.inf], np.float32)
    counts = np.array([10, 2], np.int64)
    out = torch_compat.allreduce_stats(mins, maxs, counts)
    for got, want in zip(out, (mins, maxs, counts), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


GLOO_CYCLES = textwrap.dedent(
    """
    import socket, sys
    import numpy as np
    import torch.distributed as dist
    import torch_compat

    for i in range(int(sys.argv[1])):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
        torch_compat.allreduce_stats(
            np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.int64)
        )
        torch_compat._allreduce.broadcast_from_rank0([0.0, 1.0])
        dist.destroy_process_group()  # at once, as a run's teardown may
    print("cycles done")
    """
)


def test_destroying_the_group_right_after_a_reduction_does_not_hang():
    """torch 2.1's gloo (the floor) deadlocked when a worker thread freed the last reference
    to a collective's tensor while the main thread joined it in destroy_process_group: the
    reducer keeps its tensors, so their last release is the main thread's. Without that, the
    first cycles hang (seen on the floor); the subprocess's timeout turns a hang into a
    failure."""
    proc = subprocess.run(
        [sys.executable, "-c", GLOO_CYCLES, "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cycles done" in proc.stdout


def test_callback_reduces_and_raises_nonfinite_at_epoch_end_under_ddp(gloo_group):
    module, cb = fitted([make_outputs(0)])
    assert cb.hook.reducer is torch_compat.allreduce_stats
    lo, hi = reference.min_max(to_numpy(make_outputs(0))["anomaly_maps"])
    assert module.normalization_metrics.read()["image"] == (lo, hi)

    poisoned = make_outputs(1)
    poisoned["anomaly_maps"][0, 0, 0, :3] = math.nan
    cb.on_validation_epoch_start(None, module)
    cb.on_validation_batch_end(None, module, poisoned, None, 0)  # deferred: every rank raises
    with pytest.raises(jaxnorm.NonFiniteScoresError, match="3 non-finite.*summed over all"):
        cb.on_validation_epoch_end(None, module)


def test_reducer_combines_ranks_with_min_max_sum(monkeypatch):
    """Another rank simulated in all_reduce: the callback must end with the global stats."""
    other = {
        dist.ReduceOp.MIN: (np.array([-7.0, -7.0], np.float32), np.minimum),
        dist.ReduceOp.MAX: (np.array([9.0, 9.0], np.float32), np.maximum),
        dist.ReduceOp.SUM: (np.array([4, 0], np.int64), np.add),
    }
    calls = []

    def all_reduce(tensor, op):
        values, combine = other[op]
        calls.append(op)
        tensor.copy_(torch.from_numpy(combine(tensor.numpy(), values)))

    monkeypatch.setattr(torch_compat._allreduce, "ddp_active", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    module, cb = fitted([{"pred_scores": torch.tensor([1.0, 2.0])}])
    assert calls == [dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.SUM]
    assert module.normalization_metrics.read()["image"] == (-7.0, 9.0)
