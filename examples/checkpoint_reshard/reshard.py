"""Train with TP=2, resume the checkpoint with TP=4, and check they agree.

1. Train the byte-level GPT on a `data=4 x model=2` mesh for `--steps` steps and save
   a checkpoint (with the resolved config beside it).
2. Restore that checkpoint onto a `data=2 x model=4` mesh: Orbax reads each array
   straight into its new sharding (the target is `tx.abstract_state`: nothing is
   placed first). Check every array equals the saved one exactly, and that the
   tensor-parallel weights are now split 4 ways.
3. Go on training on TP=4 for `--more` steps (the data continues at the
   checkpoint's global sample) and check the losses equal those of an
   uninterrupted TP=2 run over the same batches (to 1e-5: the two layouts sum in
   different orders).

    python examples/checkpoint_reshard/reshard.py        # 8 CPU devices, ~1 min
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `models/` lives at the repository root

import titanax as tx  # noqa: E402

tx.simulate_cpu_devices(8)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "gpt_small_tp.yaml"
TP2, TP4 = "mesh={data: 4, model: 2}", "mesh={data: 2, model: 4}"


def losses(path: Path) -> dict[int, float]:
    with path.open() as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--more", type=int, default=5)
    args = parser.parse_args()
    total = args.steps + args.more
    work = Path(tempfile.mkdtemp(prefix="titanax-reshard-"))
    common = [
        "logging.every=1",
        "logging.console=none",
        "optimizer.schedule=constant",
        "checkpoint.async_=false",
        f"checkpoint.path={work / 'ckpt'}",
    ]

    # 1. TP=2, saved at `--steps`.
    first = tx.config.load_config(
        CONFIG, [*common, TP2, f"steps={args.steps}", f"logging.csv={work / 'a.csv'}"]
    )
    saved = tx.config.train(first).state
    saved_host = jax.device_get(eqx.filter(saved, eqx.is_array))

    # 2. Restore onto TP=4: the same numbers, in the new layout.
    second = tx.config.load_config(
        CONFIG,
        [
            *common,
            TP4,
            f"steps={total}",
            "checkpoint.resume=true",
            f"logging.csv={work / 'b.csv'}",
        ],
    )
    run = tx.config.build_run(second, loggers=[])
    # The restore target: shapes and TP=4 shardings, nothing allocated.
    target = tx.abstract_state(
        run.make_model, run.plan, run.mesh, run.trainer.optimizer
    )
    restored = run.trainer.checkpoint.restore(target)
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)),
        saved_host,
        jax.device_get(eqx.filter(restored, eqx.is_array)),
    )
    assert all(jax.tree.leaves(same)), "a restored array differs from the saved one"
    w = restored.model.blocks.w_mlp_in
    shard = w.sharding.shard_shape(w.shape)
    print(
        f"restored step {int(restored.step)}: every array equal; w_mlp_in "
        f"{w.shape} is split {w.sharding.spec} -> shards {shard}"
    )
    assert w.sharding.shard_shape(w.shape)[-1] == w.shape[-1] // 4

    # 3. Go on with TP=4 from the checkpoint; compare with an unbroken TP=2 run.
    tx.config.train(second)
    unbroken = tx.config.load_config(
        CONFIG,
        [
            "logging.every=1",
            "logging.console=none",
            "optimizer.schedule=constant",
            TP2,
            f"steps={total}",
            f"logging.csv={work / 'c.csv'}",
        ],
    )
    tx.config.train(unbroken)
    resumed, reference = losses(work / "b.csv"), losses(work / "c.csv")
    worst = max(abs(resumed[s] - reference[s]) for s in resumed)
    for s in sorted(resumed):
        print(
            f"step {s}: TP=4 resumed {resumed[s]:.6f}  TP=2 unbroken {reference[s]:.6f}"
        )
    print(f"largest difference {worst:.2e}")
    assert sorted(resumed) == list(range(args.steps + 1, total + 1)), sorted(resumed)
    assert worst <= 1e-5, worst


if __name__ == "__main__":
    main()
