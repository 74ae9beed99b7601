"""One process of a multi-process checkpointed run (`test_checkpoint_multiprocess.py`).

Run as `python _ckpt_worker.py PORT NUM_PROCESSES PROCESS_ID --dir D [--steps N]
[--every K] [--trainer]`, with `JAX_NUM_CPU_DEVICES` set. It joins the run over
`jax.distributed`, trains the small MLP under DP over every device of every process
(each process feeds its own rows of every global batch) and saves with
`OrbaxCheckpoint` every K steps. The loop is either hand-written (`tx.make_train_step`,
asking a `PreemptionGuard` at every step whether to stop; stopped, it saves that
step on every process and exits with 75, EX_TEMPFAIL) or, with `--trainer`,
`Trainer.fit`, which does the same and raises `tx.Preempted`.

Stdout: `step N` lines, then one JSON line: `{"process": i, "stopped": step,
"preempted": bool, "steps": [...saved...]}`. Process 0 also writes the state it
saved last, gathered whole, to `D.npz`.

The model, data and loss are importable, so the test can continue the run in one
process and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

GLOBAL_BATCH = 16
IN, HIDDEN, OUT = 16, 32, 4
PREEMPTED = 75  # EX_TEMPFAIL: the scheduler should requeue the job


def batch_at(index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Global batch number `index` (or the given rows of it)."""
    rng = np.random.default_rng(1000 + index)
    x = rng.normal(size=(GLOBAL_BATCH, IN)).astype(np.float32)
    y = rng.integers(0, OUT, size=(GLOBAL_BATCH,)).astype(np.int32)
    return {"x": x[rows], "y": y[rows]}


def make_model(key):
    from models.mlp import MLP

    return MLP(IN, OUT, (HIDDEN,), key=key)


def setup(mesh=None):
    """(plan, mesh, train step, optimizer) for DP over every device."""
    import titanax as tx
    from models.mlp import cross_entropy_loss

    mesh = mesh if mesh is not None else tx.make_mesh(data=-1)
    plan = tx.Plan(dp=tx.DP("data"))
    optimizer = tx.optim.adamw(1e-2)
    train = tx.make_train_step(cross_entropy_loss, optimizer, plan, mesh)
    return plan, mesh, train, optimizer


def host_leaves(state) -> list[np.ndarray]:
    """Every array of `state`, gathered whole on this host."""
    import equinox as eqx
    import jax
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(eqx.filter(state, eqx.is_array))
    gather = multihost_utils.process_allgather
    return [np.asarray(gather(x, tiled=True)) for x in leaves]


def loop(args, plan, mesh, train, ckpt, rows):
    """The hand-written loop; (last step, preempted, the state saved last)."""
    import titanax as tx

    state = train.init(make_model, 0)
    step, preempted, saved = 0, False, None
    with tx.PreemptionGuard() as guard:
        while step < args.steps:
            batch = tx.put_batch(batch_at(step, rows), plan, mesh)
            state, _ = train.step(state, batch)
            step += 1
            time.sleep(args.slow)  # a real step takes a while
            ckpt.raise_if_failed()
            stop = guard.should_stop(step)  # the same answer on every process
            if ckpt.should_save(step) or stop:
                saved = state  # its data position counts samples
                ckpt.save(saved, step=step, force=True, plan=plan, mesh=mesh)
            print(f"step {step}", flush=True)
            if stop:
                preempted = True
                break
    return step, preempted, saved


def fit(args, plan, mesh, optimizer, ckpt, rows):
    """`Trainer.fit`; (last step, preempted, the state saved last)."""
    import titanax as tx
    from models.mlp import cross_entropy_loss

    def hook(step, metrics, trainer):
        time.sleep(args.slow)  # a real step takes a while
        print(f"step {step}", flush=True)

    trainer = tx.Trainer(
        make_model,
        plan,
        mesh=mesh,
        optimizer=optimizer,
        loss=cross_entropy_loss,
        checkpoint=ckpt,
        log_every=1,
        hooks=[hook],
    )
    data = [batch_at(i, rows) for i in range(args.steps)]
    try:
        state = trainer.fit(data, steps=args.steps)
        return int(state.step), False, state
    except tx.Preempted as e:
        return e.step, True, trainer.state


def main() -> int:
    port, num_processes, process_id = (int(a) for a in sys.argv[1:4])
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--slow", type=float, default=0.05)
    p.add_argument("--trainer", action="store_true")
    args = p.parse_args(sys.argv[4:])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    import titanax as tx

    plan, mesh, train, optimizer = setup()
    local = GLOBAL_BATCH // num_processes
    rows = slice(process_id * local, (process_id + 1) * local)
    ckpt = tx.OrbaxCheckpoint(args.dir, keep=2, every=args.every)
    if args.trainer:
        step, preempted, saved = fit(args, plan, mesh, optimizer, ckpt, rows)
    else:
        step, preempted, saved = loop(args, plan, mesh, train, ckpt, rows)
    ckpt.wait()
    steps = ckpt.steps()
    ckpt.close()
    if saved is not None:
        leaves = host_leaves(saved)  # a collective: every process takes part
        if process_id == 0:
            np.savez(args.dir + ".npz", *leaves)
    result = {
        "process": process_id,
        "stopped": step,
        "preempted": preempted,
        "steps": steps,
    }
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()
    return PREEMPTED if preempted else 0


if __name__ == "__main__":
    sys.exit(main())
