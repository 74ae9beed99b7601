"""GPT checkpoints across JAX versions, for tests/test_cross_versions.py (a script).

Run by one virtual environment's Python (the newest or the minimum versions) with
8 simulated CPU devices; prints one JSON line: the versions in use and the losses.

- `write DIR`: trains a small GPT (DP=2 x TP=4, AdamW) for 4 steps on batches it
  stores in `DIR/batches.npz`; the checkpoint of step 2 (saved synchronously by
  `OrbaxCheckpoint`) is copied to `DIR/step2` before steps 3-4 run on. Prints
  `{"versions", "losses": [steps 1-4]}`.
- `read DIR LAYOUT`: resumes from `DIR/step2` (written by the other versions) on
  `LAYOUT` (`dp2tp4`, or `single`: one device) and trains steps 3-4 on the stored
  batches. Prints `{"versions", "resumed": [steps 3-4]}`.

The model passed to the Trainer is only its shape template on `read`: every value
comes from the checkpoint. Batches are stored rather than regenerated because
numpy does not promise the same random stream across its versions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import titanax as tx  # noqa: E402
from models import gpt_plans  # noqa: E402
from models.gpt import GPT, GPTConfig, gpt_loss  # noqa: E402
from titanax._versions import versions  # noqa: E402

# Four heads and a vocabulary of 64 divide over TP=4; biases on, so that every kind
# of parameter (column-/row-parallel, vocab-parallel, replicated) is checkpointed.
CONFIG = GPTConfig.preset("tiny", n_head=4, bias=True)
BATCH = 8  # rows per step
STEPS = 4
SAVED = 2  # the step the checkpoint holds


def _layout(name: str) -> tuple[tx.Plan, object]:
    if name == "dp2tp4":
        return gpt_plans.dp_tp(), tx.make_mesh(data=2, model=4)
    if name == "single":
        return tx.Plan(), tx.make_mesh(jax.devices()[:1], data=1)
    raise SystemExit(f"unknown layout {name!r}")


def _trainer(layout: str, losses: list[float], checkpoint=None) -> tx.Trainer:
    plan, mesh = _layout(layout)
    return tx.Trainer(
        GPT(CONFIG, key=jax.random.key(0)),
        plan,
        optimizer=tx.optim.adamw(1e-3, weight_decay=0.1, clip_norm=1.0),
        loss=gpt_loss,
        mesh=mesh,
        checkpoint=checkpoint,
        log_every=1,
        hooks=[lambda step, metrics, t: losses.append(float(metrics["loss"]))],
    )


def _batches(directory: Path) -> list[dict[str, np.ndarray]]:
    with np.load(directory / "batches.npz", allow_pickle=False) as f:
        return [{"x": f[f"x{i}"], "y": f[f"y{i}"]} for i in range(STEPS)]


def write(directory: Path) -> dict[str, object]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (STEPS, BATCH, CONFIG.block_size + 1))
    tokens = tokens.astype(np.int32)
    directory.mkdir(parents=True)
    np.savez(
        directory / "batches.npz",
        **{f"x{i}": t[:, :-1] for i, t in enumerate(tokens)},
        **{f"y{i}": t[:, 1:] for i, t in enumerate(tokens)},
    )
    batches = _batches(directory)
    losses: list[float] = []
    checkpoint = tx.OrbaxCheckpoint(directory / "ckpt", every=SAVED, async_=False)
    trainer = _trainer("dp2tp4", losses, checkpoint)
    trainer.fit(batches, steps=SAVED)
    shutil.copytree(directory / "ckpt", directory / "step2")
    # On from the state in memory; a fit without `resume` starts at the data's
    # beginning, so it gets the batches of steps 3-4 (a resume skips to them).
    trainer.fit(batches[SAVED:], steps=STEPS)
    return {"versions": versions(), "losses": losses}


def read(directory: Path, layout: str) -> dict[str, object]:
    losses: list[float] = []
    state = _trainer(layout, losses).fit(
        _batches(directory), steps=STEPS, resume=str(directory / "step2")
    )
    assert int(state.step) == STEPS, int(state.step)
    return {"versions": versions(), "resumed": losses}


def main(argv: list[str]) -> None:
    tx.simulate_cpu_devices(8)
    command, directory = argv[0], Path(argv[1])
    out = write(directory) if command == "write" else read(directory, argv[2])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
