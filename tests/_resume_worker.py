"""A small training run that checkpoints, for the resume tests (run as a script).

Trains `models.mlp.MLP` with `tx.make_train_step` (DP over every device), saving
every `--every` steps with `OrbaxCheckpoint`, under a `PreemptionGuard`. The loss
adds input noise from the step's key, so a resumed run only matches if the RNG
stream continues. Batches come from a re-iterable source indexed by position; a
resumed run skips `state.data_position` of them.

Flags simulate failures: `--kill-after N` SIGKILLs the process after step N,
`--pause-after N` waits after step N for a SIGTERM (sent by the test), and
`--kill-during-save N` SIGKILLs the process right after the asynchronous save of
step N has started. Disk failures (run under a tmpfs mount by the test):
`--fill-disk-at N` fills the filesystem of `--dir` (leaving `--leave-free` bytes)
just before the save of step N; `--read-only-at N` remounts `--mount` read-only
there. `--slow S` sleeps S seconds per step from then on, as a real step would
take. The final state's arrays go to `--out` (a `.npz`).

The loop is what a Trainer does: `raise_if_failed()` every step, `save` when due,
and `PreemptionGuard.should_stop(step)`. The step counts the data position in
samples (global rows); a resumed run starts at that sample.

Progress lines on stdout: `step N`, `resumed N`, `paused N`, `preempted N`,
`saving N`, `error N <seconds since the failed save started>`, `done N`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from models.mlp import MLP, cross_entropy_loss  # noqa: E402
from titanax._errors import CheckpointError  # noqa: E402
from titanax._mesh import make_mesh  # noqa: E402
from titanax._plan import DP, Plan  # noqa: E402
from titanax.checkpoint import (  # noqa: E402
    OrbaxCheckpoint,
    PreemptionGuard,
)
from titanax.optim import adamw  # noqa: E402
from titanax.train import abstract_state, make_train_step  # noqa: E402

BATCH = 16
IN, OUT = 16, 8


def batch_at(index: int) -> dict[str, np.ndarray]:
    """Batch number `index` of the data stream (deterministic)."""
    rng = np.random.default_rng(index)
    return {
        "x": rng.standard_normal((BATCH, IN)).astype(np.float32),
        "y": rng.integers(0, OUT, BATCH).astype(np.int32),
    }


def data(start: int = 0):
    """The data stream from position `start` (a re-iterable source, skipped)."""
    return itertools.islice((batch_at(i) for i in itertools.count()), start, None)


def noisy_loss(model, batch, key):
    x = batch["x"]
    if key is not None:  # uses the step's key: a wrong RNG on resume shows up
        x = x + 0.1 * jax.random.normal(key, x.shape, x.dtype)
    return cross_entropy_loss(model, {"x": x, "y": batch["y"]}, key)


def say(text: str) -> None:
    print(text, flush=True)


def fill_disk(path: str, leave: int) -> None:
    """Write a junk file until `leave` bytes are free on `path`'s filesystem."""
    free = shutil.disk_usage(path).free
    with open(os.path.join(path, "junk"), "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-after", type=int, default=None)
    p.add_argument("--pause-after", type=int, default=None)
    p.add_argument("--kill-during-save", type=int, default=None)
    p.add_argument("--fill-disk-at", type=int, default=None)
    p.add_argument("--leave-free", type=int, default=256 * 1024)
    p.add_argument("--read-only-at", type=int, default=None)
    p.add_argument("--mount", default=None)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--keep", type=int, default=3)
    args = p.parse_args()

    jax.config.update("jax_threefry_partitionable", True)
    mesh = make_mesh(data=-1)
    plan = Plan(dp=DP("data"))
    optimizer = adamw(1e-2)
    hidden = tuple(args.hidden)

    def make_model(key):
        return MLP(IN, OUT, hidden, key=key)

    train = make_train_step(noisy_loss, optimizer, plan, mesh)
    ckpt = OrbaxCheckpoint(args.dir, keep=args.keep, every=args.every)
    if args.resume and ckpt.latest_step() is not None:
        target = abstract_state(make_model, plan, mesh, optimizer, key=0)
        state = ckpt.restore(target)
        say(f"resumed {int(state.step)}")
    else:
        state = train.init(make_model, 0)
    step = int(state.step)
    first = int(state.data_position) // BATCH  # samples -> batches
    slow, failing_since = 0.0, None

    def save(force: bool = False) -> bool:
        return ckpt.save(state, step=step, force=force, plan=plan, mesh=mesh)

    with PreemptionGuard() as guard:
        for batch in data(first):
            if step >= args.steps:
                break
            state, _ = train.step(state, batch)
            step += 1
            time.sleep(slow)
            try:
                ckpt.raise_if_failed()  # every step: a failed save stops the run
                if step in (args.fill_disk_at, args.read_only_at):
                    ckpt.wait()
                    if step == args.fill_disk_at:
                        fill_disk(args.dir, args.leave_free)
                    else:
                        mount = args.mount or args.dir
                        cmd = ["mount", "-o", "remount,ro", mount]
                        subprocess.run(cmd, check=True)
                    slow, failing_since = args.slow, time.monotonic()
                if save():
                    say(f"saving {step}")
                    if step == args.kill_during_save:
                        os.kill(os.getpid(), signal.SIGKILL)
            except CheckpointError:
                since = time.monotonic() - (failing_since or time.monotonic())
                say(f"error {step} {since:.3f}")
                raise
            say(f"step {step}")
            if step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.pause_after:
                say(f"paused {step}")
                deadline = time.monotonic() + 60
                while not guard.requested and time.monotonic() < deadline:
                    time.sleep(0.01)
            if guard.should_stop(step):  # preemption: save this step, exit cleanly
                save(force=True)
                ckpt.close()
                say(f"preempted {step}")
                return 0

    save(force=True)
    ckpt.close()
    if args.out:
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_array))
        np.savez(args.out, *[np.asarray(x) for x in leaves])
    say(f"done {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
