"""`Trainer.fit(data, steps=N, resume=True)` as a user's script runs it: the same
command after a crash or a preemption ends where an uninterrupted run ends.

Run as a script by tests/test_trainer_resume.py. Flags: `--kill-at K` SIGKILLs the
process after step K (from a hook, while the save of step K, if due, is in flight;
with `--wait-saves`, once the saves started so far are complete);
`--term-at K` sends itself SIGTERM after step K (the Trainer saves and raises
`tx.Preempted`, exit code 75). The final parameters and optimizer state go to
`--out` (`.npz`). Prints `resumed-from N` and `done N`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import titanax as tx  # noqa: E402
from models.mlp import MLP, cross_entropy_loss  # noqa: E402

ROWS, IN, OUT = 16, 16, 8


def batches(n: int = 12) -> list[dict[str, np.ndarray]]:
    """A re-iterable source: `fit` re-reads it for more epochs."""
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.standard_normal((ROWS, IN)).astype(np.float32),
            "y": rng.integers(0, OUT, ROWS).astype(np.int32),
        }
        for _ in range(n)
    ]


def noisy_loss(model, batch, key):
    # Input noise from the step's key: a resume matches only if the RNG continues.
    x = batch["x"] + 0.1 * jax.random.normal(key, batch["x"].shape)
    return cross_entropy_loss(model, {"x": x, "y": batch["y"]})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--term-at", type=int, default=-1)
    parser.add_argument("--wait-saves", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    def signals(step, metrics, trainer):
        if step == args.kill_at:
            if args.wait_saves:  # else the save of this step may be in flight
                trainer.checkpoint.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = tx.Trainer(
        lambda key: MLP(IN, OUT, hidden_sizes=(32,), key=key),
        tx.Plan(dp=tx.DP("data")),
        optimizer=tx.optim.adamw(1e-2, warmup_steps=5, total_steps=args.steps),
        loss=noisy_loss,
        checkpoint=tx.OrbaxCheckpoint(args.dir, every=args.every),
        loggers=[],
        log_every=1,
        hooks=[signals],
        seed=7,
    )
    checkpoint = trainer.checkpoint
    start = checkpoint.latest_step()
    print(f"resumed-from {start if start is not None else 0}", flush=True)
    try:
        state = trainer.fit(batches(), steps=args.steps, resume=True)
    except tx.Preempted as preempted:
        print(f"preempted {preempted.step}", flush=True)
        raise  # a SystemExit: the process ends with exit code 75
    print(f"done {int(state.step)}", flush=True)
    if args.out:
        arrays = [
            np.asarray(x)
            for x in jax.tree.leaves((state.model, state.opt_state))
            if isinstance(x, jax.Array | jnp.ndarray)
        ]
        np.savez(args.out, *arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
