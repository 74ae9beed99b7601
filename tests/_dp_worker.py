"""One process of the multi-process DP run (`tests/test_multiprocess.py`).

Run as `python _dp_worker.py PORT NUM_PROCESSES PROCESS_ID [--die]`, with
`JAX_NUM_CPU_DEVICES` set. It joins the run over `jax.distributed`, trains the
tiny model with `Trainer.fit` under DP over every device of every process, feeding
only its own rows of each global batch, and prints one JSON line on stdout:
`{"process": i, "losses": [...], "param_sum": ...}`. With `--die` it exits with
code 3 right after joining, to play a dead peer.

The model, data and loss are importable, so the test can run the same training in
one process over 8 devices and compare.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

STEPS = 6
GLOBAL_BATCH = 8  # 4 rows per process: fewer than the 8 data shards
IN, HIDDEN, OUT = 16, 32, 4


def batches(steps: int = STEPS, rows: slice = slice(None)) -> list[dict]:
    """The global batches (or the given rows of each)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(GLOBAL_BATCH, IN)).astype(np.float32)
        y = rng.integers(0, OUT, size=(GLOBAL_BATCH,)).astype(np.int32)
        out.append({"x": x[rows], "y": y[rows]})
    return out


def make_model():
    import jax

    from models.mlp import MLP

    # One compiled call: eager ops are slow (~0.3 s each) once jax.distributed runs.
    return jax.jit(lambda: MLP(IN, OUT, (HIDDEN,), key=jax.random.key(0)))()


def train(batch_list: list[dict]) -> tuple[list[float], float]:
    """`Trainer.fit` under DP over all devices; per-step losses and a param sum."""
    import jax
    import optax

    import titanax as tx
    from models.mlp import cross_entropy_loss

    losses: list[float] = []
    trainer = tx.Trainer(
        make_model(),
        tx.Plan(dp=tx.DP("data")),
        optimizer=optax.adamw(1e-2),
        loss=cross_entropy_loss,
        log_every=1,
        hooks=[lambda step, metrics, trainer: losses.append(metrics["loss"])],
    )
    state = trainer.fit(batch_list)
    leaves = jax.tree.leaves(jax.device_get(state.model))
    param_sum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))
    return losses, param_sum


def main() -> None:
    port, num_processes, process_id = (int(a) for a in sys.argv[1:4])
    die = "--die" in sys.argv[4:]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)  # for `models`

    import jax

    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
    )
    if die:
        os._exit(3)  # no shutdown handshake: a peer that vanished
    local = GLOBAL_BATCH // num_processes
    rows = slice(process_id * local, (process_id + 1) * local)
    losses, param_sum = train(batches(rows=rows))
    print(
        json.dumps({"process": process_id, "losses": losses, "param_sum": param_sum}),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
