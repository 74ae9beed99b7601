"""Train a digit classifier (MLP or CNN from `models/`) with data parallelism.

The batch is split over a `data` mesh axis of `--dp` simulated CPU devices (8 by
default); the model and AdamW state are replicated and the gradients averaged once per
step inside the compiled step. Test accuracy comes from `trainer.evaluate`.

    python examples/mnist_dp/train.py --model mlp             # scikit-learn digits
    python examples/mnist_dp/train.py --model cnn --data ../shared/data/mnist

Without `--data`, it uses scikit-learn's bundled 8x8 digits (1,797 images, 80/20
split). With `--data DIR`, it reads the MNIST IDX gzip files there; with only the
10,000-image test set present, 8,000 train and 2,000 test (see `data.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# This example simulates its devices on the CPU, even where a GPU is present.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = Path(__file__).resolve().parent
# `models/` lives at the repository root; `data.py` next to this file.
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import jax  # noqa: E402
from data import load_mnist, load_sklearn_digits, pipeline  # noqa: E402

import titanax as tx  # noqa: E402
from models.cnn import CNN  # noqa: E402
from models.mlp import MLP, cross_entropy_loss  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument(
        "--data",
        default=None,
        help="a folder of MNIST IDX gzip files; default: scikit-learn's 8x8 digits",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument(
        "--batch", type=int, default=40, help="global batch (a multiple of --dp)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate")
    p.add_argument("--dp", type=int, default=8, help="simulated CPU devices / DP size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dp < 1 or args.batch < 1 or args.batch % args.dp:
        p.error(f"--batch {args.batch} must be a positive multiple of --dp {args.dp}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    tx.simulate_cpu_devices(args.dp)  # before JAX computes anything

    if args.data:
        train, test = load_mnist(args.data)
        source = f"MNIST IDX files in {args.data}"
    else:
        train, test = load_sklearn_digits(seed=args.seed)
        source = "scikit-learn digits (8x8)"
    side = train.x.shape[1]
    print(f"data: {source}: {len(train)} train, {len(test)} test, {side}x{side}")

    def make_model(key: jax.Array) -> MLP | CNN:
        if args.model == "mlp":
            return MLP(side * side, 10, hidden_sizes=(128,), key=key)
        # 8x8 -> 8x8 -> 4x4 maps; 28x28 -> 28x28 -> 14x14 -> 7x7 before pooling.
        channels = (16, 32) if side <= 8 else (16, 32, 64)
        return CNN(10, channels=channels, key=key)

    lr = args.lr if args.lr is not None else {"mlp": 3e-3, "cnn": 2e-2}[args.model]
    trainer = tx.Trainer(
        make_model,  # `key -> model`: created directly on the devices
        tx.Plan(dp=tx.DP("data")),
        mesh=tx.make_mesh(data=args.dp),
        optimizer=tx.optim.adamw(
            lr, warmup_steps=args.steps // 20, total_steps=args.steps
        ),
        loss=cross_entropy_loss,  # (loss, {"accuracy": ...})
        loggers=[tx.loggers.Basic()],
        log_every=max(1, args.steps // 10),
        seed=args.seed,
    )
    tests = pipeline(test, args.batch, train=False)  # in order, one pass
    n_eval = (tests.num_batches() or 0) * args.batch
    before = trainer.evaluate(tests)
    print(f"before training: test loss {before['loss']:.4f}, ", end="")
    print(f"test accuracy {before['accuracy']:.4f}")

    # Shuffled by (seed, epoch); the trainer reads it from its data position.
    trainer.fit(pipeline(train, args.batch, seed=args.seed), steps=args.steps)

    after = trainer.evaluate(tests)
    print(f"test loss {after['loss']:.4f}")
    print(f"test accuracy {after['accuracy']:.4f} ({n_eval} of {len(test)} images)")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return after


if __name__ == "__main__":
    main()
