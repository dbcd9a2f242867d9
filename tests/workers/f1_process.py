"""One process of tests/jaxnorm/test_f1_multiprocess.py: an F1 threshold over every process's data.

Usage: python tests/workers/f1_process.py BACKEND WORKDIR [PORT NUM_PROCESSES PROCESS_ID]

BACKEND is ``jax`` (jax.distributed with gloo; the reducer is
``jaxnorm.distributed.allreduce_across_processes``) or ``ddp`` (torch.distributed with
gloo, from torchrun's environment variables; the reducer is torch_compat's, the one a
Lightning DDP run uses). Reads ``WORKDIR/inputs.pkl`` and writes ``WORKDIR/result{i}.json``:
for each mode, the threshold's float32 bits, its f1 and the bound on f1 lost.
"""

import datetime
import inspect
import json
import os
import pickle
import sys
from pathlib import Path


def reducer_for(backend: str, argv: list[str]):
    if backend == "jax":
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        port, n, i = (int(a) for a in argv)
        known = inspect.signature(jax.distributed.initialize).parameters
        timeouts = {"heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 30}
        jax.distributed.initialize(
            f"127.0.0.1:{port}",
            num_processes=n,
            process_id=i,
            initialization_timeout=60,
            **{k: v for k, v in timeouts.items() if k in known},
        )
        import jaxnorm.distributed

        return i, jaxnorm.distributed.allreduce_across_processes, jax.distributed.shutdown
    import torch.distributed as dist

    from torch_compat._allreduce import allreduce_stats

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    return int(os.environ["RANK"]), allreduce_stats, dist.destroy_process_group


def main(backend: str, workdir: Path, argv: list[str]) -> None:
    rank, reducer, shutdown = reducer_for(backend, argv)
    import numpy as np

    import jaxnorm

    with open(workdir / "inputs.pkl", "rb") as f:
        spec = pickle.load(f)
    result = {}
    for name, mode, kw in (("exact", "exact", {}), ("bounded", "bounded", {"buffer": 0})):
        state = jaxnorm.F1AdaptiveThreshold.empty(mode, **kw)
        for scores, labels in spec["shards"][rank]:
            state = state.update(scores, labels)
        out = state.compute_with_bound(reducer)
        result[name] = {
            "bits": int(np.float32(out.threshold).view(np.uint32)),
            "f1": float(out.f1),
            "max_f1_lost": float(out.max_f1_lost),
        }
    with open(workdir / f"result{rank}.json", "w") as f:
        json.dump(result, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
