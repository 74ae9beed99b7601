"""One process of the 2-process data run (`tests/test_data_multiprocess.py`).

Run as `python _data_worker.py PORT NUM_PROCESSES PROCESS_ID`, with
`JAX_NUM_CPU_DEVICES` set. It joins the run over `jax.distributed`, reads its own
rows of each global batch from a `titanax.data.Pipeline` under DP=8 and under
DP=2 x TP=4 (meshes over every device of every process), builds the global arrays
with `jax.make_array_from_process_local_data`, gathers them back to the host, and
prints one JSON line: per layout its rows, its local ids and the reassembled
global ids per step; then the first global batch of a DP=8 stream saved after
`SAVED_STEPS` batches and resumed under DP=2 x TP=4.

The pipeline is importable, so the test builds the same stream in one process.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

GLOBAL_BATCH = 16
SAMPLES = 45  # not a multiple of the batch: batches straddle epochs
SEED = 4
STEPS = 3
SAVED_STEPS = 2


def make_pipeline():
    import titanax as tx

    ids = np.arange(SAMPLES)
    source = {"id": ids, "v": np.stack([ids * 10, ids * 10 + 1], axis=1)}
    return tx.data.Pipeline(source, GLOBAL_BATCH, seed=SEED)


def layouts() -> dict:
    import titanax as tx

    return {
        "dp8": (tx.make_mesh(data=8), tx.Plan(dp=tx.DP("data"))),
        "dp2_tp4": (
            tx.make_mesh(data=2, model=4),
            tx.Plan(dp=tx.DP("data"), tp=tx.TP("model")),
        ),
    }


def _global(batch: dict, plan, mesh) -> dict[str, list]:
    """The global batch assembled from every process's rows, back on the host."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding

    out = {}
    for key, local in batch.items():
        sharding = NamedSharding(mesh, plan.batch_spec(local.ndim))
        array = jax.make_array_from_process_local_data(sharding, local)
        out[key] = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return {k: v.tolist() for k, v in out.items()}


def main() -> None:
    port, num_processes, process_id = (int(a) for a in sys.argv[1:4])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
    )
    pipeline = make_pipeline()
    result: dict = {"process": process_id, "layouts": {}}
    for name, (mesh, plan) in layouts().items():
        rows = pipeline.rows(plan, mesh)
        local_ids, global_batches = [], []
        with pipeline.batches(0, plan, mesh) as batches:
            for _ in range(STEPS):
                local = next(batches)
                local_ids.append(local["id"].tolist())
                global_batches.append(_global(local, plan, mesh))
        result["layouts"][name] = {
            "rows": rows.tolist(),
            "local_ids": local_ids,
            "global": global_batches,
        }

    (dp8_mesh, dp8), (tp_mesh, dp_tp) = layouts().values()
    with pipeline.batches(0, dp8, dp8_mesh) as saved_run:
        for _ in range(SAVED_STEPS):
            next(saved_run)
        position = saved_run.position  # what the checkpoint stores
    with pipeline.batches(position, dp_tp, tp_mesh) as resumed:
        result["resumed"] = {
            "position": position,
            "global": _global(next(resumed), dp_tp, tp_mesh),
        }
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
