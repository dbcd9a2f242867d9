"""One JAX process of tests/jaxnorm/test_multiprocess.py.

Usage: python tests/workers/jax_process.py PORT NUM_PROCESSES PROCESS_ID WORKDIR

Reads ``WORKDIR/inputs.pkl`` (written by the test), validates this process's shard through
``MinMaxNormalizationHook``, normalizes the common test batches, and writes
``WORKDIR/result{PROCESS_ID}.json`` and ``WORKDIR/outputs{PROCESS_ID}.npz``.
"""

import inspect
import json
import pickle
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, num_processes: int, process_id: int, workdir: Path) -> None:
    timeouts = {"heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 30}
    known = inspect.signature(jax.distributed.initialize).parameters  # jax < 0.6.1 has neither
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        **{k: v for k, v in timeouts.items() if k in known},
    )
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxnorm
    import jaxnorm.distributed

    with open(workdir / "inputs.pkl", "rb") as f:
        spec = pickle.load(f)
    cfg = spec["config"]
    # This process's local devices only: the data of a process is its own.
    local = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))

    def put(batch):
        out = {}
        for key, value in batch.items():
            if key == "box_scores":
                out[key] = [jax.device_put(b) for b in value]
            else:
                out[key] = jax.device_put(value, NamedSharding(local, P("data")))
        return out

    hook = jaxnorm.MinMaxNormalizationHook(
        cfg["image_threshold"],
        cfg["pixel_threshold"],
        stats=cfg["stats"],
        nonfinite=cfg["nonfinite"],
        thresholds=cfg.get("thresholds"),
        reducer=None if cfg["no_reduce"] else "auto",
    )
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "errors": [],
        "thresholds": [],
    }
    epochs = spec["shards"][process_id]
    for epoch, batches in enumerate(epochs):
        hook.on_validation_epoch_start()
        for batch in batches:
            hook.on_validation_batch_end(put(batch))
        try:
            hook.on_validation_epoch_end()
        except jaxnorm.NonFiniteScoresError as e:
            result["errors"].append({"epoch": epoch, "key": e.key, "count": e.count, "msg": str(e)})
        result["thresholds"].append([hook.image_threshold, hook.pixel_threshold])
    result["host_stats"] = hook.host_stats()

    arrays = {}
    if not result["errors"]:
        hook.on_test_start()
        for b, batch in enumerate(spec["test"]):
            for stage, fn in (
                ("test", hook.on_test_batch_end),
                ("predict", hook.on_predict_batch_end),
            ):
                out = fn(put(batch))
                for key in ("pred_scores", "anomaly_maps"):
                    if key in out:
                        arrays[f"{stage}/{b}/{key}"] = np.asarray(out[key])
                for j, box in enumerate(out.get("box_scores", [])):
                    arrays[f"{stage}/{b}/box_scores/{j}"] = np.asarray(box)

    # The functional path: fold in a jitted step, then reduce_stats (a collective too).
    fold = jax.jit(jaxnorm.update_stats, static_argnames="mode")
    stats = jaxnorm.NormalizationStats.empty()
    for batch in epochs[-1] if epochs else []:
        stats = fold(stats, put(batch), mode=cfg["stats"])
    reduced = stats if cfg["no_reduce"] else jaxnorm.distributed.reduce_stats(stats)
    result["reduce_stats"] = {
        w: (float(getattr(reduced, w).min), float(getattr(reduced, w).max))
        for w in ("image", "pixel")
    }
    # Counts beyond 2**31 stay exact without x64.
    _, _, counts = jaxnorm.distributed.allreduce_across_processes(
        np.zeros(1, np.float32), np.zeros(1, np.float32), np.array(spec["counts"][process_id])
    )
    result["count_sums"] = [int(c) for c in counts]
    result["x64"] = bool(jax.config.jax_enable_x64)

    np.savez(workdir / f"outputs{process_id}.npz", **arrays)
    with open(workdir / f"result{process_id}.json", "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    port, n, i, workdir = sys.argv[1:]
    main(int(port), int(n), int(i), Path(workdir))
