"""Train a byte-level GPT (models/gpt.py) with DP, FSDP, Megatron TP and pipelines.

The mesh is `data` (DP or FSDP) x `model` (TP) x `pipe` (PP), sized from
`--dp/--fsdp/--tp/--pp`, on that many simulated CPU devices (set `JAX_PLATFORMS` to
use an accelerator); the plan and, with `--pp`, the pipeline stage come from
`models/gpt_plans.py`. Every `--eval-every` steps it prints the train and validation
loss (`trainer.evaluate` on fixed batches), and at the end a sample.

    python examples/gpt/train.py --dp 2 --tp 4                 # 8 devices, ~2 min
    python examples/gpt/train.py --dp 2 --tp 2 --pp 2 --schedule 1f1b --batch 16
    python examples/gpt/train.py --text ../shared/data/tinyshakespeare.txt --tp 2

With `--pp S` the model's blocks are split into S stages of `n_layer / S` blocks
along `pipe`, and each step runs `--microbatches` microbatches (default 2 S) through
them under `--schedule` (`1f1b` or `gpipe`); the global `--batch` must be a multiple
of the data size times the microbatches.

Without `--text` the corpus is the Python standard library's own source code (about
1 MB of the `.py` files next to `os.py`, in sorted order), which every machine that
runs this script has. Tokens are bytes (vocabulary 256); the batches are random
contiguous windows, as nanoGPT's `get_batch` draws them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# This example simulates its devices on the CPU unless told otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `models/` lives at the repository root

import jax  # noqa: E402
import numpy as np  # noqa: E402

import titanax as tx  # noqa: E402
from models import gpt_plans  # noqa: E402
from models.gpt import GPT, GPTConfig, flops_per_token, generate, gpt_loss  # noqa: E402

CORPUS_CAP = 1 << 20  # bytes of standard-library source used without --text


def stdlib_corpus(cap: int = CORPUS_CAP) -> bytes:
    """The first `cap` bytes of the standard library's top-level `.py` files,
    concatenated in sorted file-name order (the same bytes on every run)."""
    folder = Path(os.__file__).resolve().parent
    chunks, size = [], 0
    for path in sorted(folder.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


def load_text(path: str | None) -> tuple[np.ndarray, str]:
    """Bytes of `path` (or the standard-library corpus) as a uint8 array."""
    if path is None:
        data, source = stdlib_corpus(), "Python standard library sources"
    else:
        data, source = Path(path).read_bytes(), path
    return np.frombuffer(data, dtype=np.uint8), source


class RandomWindows:
    """Batches of `batch` random windows of `block + 1` bytes: `x` and `y = x`
    shifted by one. Deterministic: batch `i` depends only on `seed` and `i`.
    Iterating starts at batch 0; `from_index(i)` streams batches `i, i + 1, ...`
    (each `trainer.fit` call reads its data from the start)."""

    def __init__(self, data: np.ndarray, batch: int, block: int, seed: int):
        if len(data) <= block + 1:
            raise ValueError(f"The text ({len(data)} bytes) is shorter than a window.")
        self.data, self.batch, self.block, self.seed = data, batch, block, seed

    def get(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        starts = rng.integers(0, len(self.data) - self.block - 1, self.batch)
        windows = np.stack([self.data[s : s + self.block + 1] for s in starts])
        windows = windows.astype(np.int32)
        return {"x": windows[:, :-1], "y": windows[:, 1:]}

    def from_index(self, index: int) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.get(index)
            index += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.from_index(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=None, help="a text file; default: stdlib code")
    p.add_argument("--preset", default="baby", help="tiny, baby or small")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset")
    p.add_argument("--block", type=int, default=None, help="context (<= preset's)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dp", type=int, default=1, help="data-parallel size")
    p.add_argument("--fsdp", type=int, default=1, help="FSDP size (instead of DP)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (pipe axis)")
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    p.add_argument("--microbatches", type=int, default=None, help="default: 2 * pp")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=12, help="global batch")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=None, help="default: steps / 10")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dp > 1 and args.fsdp > 1:
        p.error("use --dp or --fsdp (they share the `data` axis), not both")
    if args.pp > 1 and args.fsdp > 1:
        p.error("--pp does not compose with --fsdp yet; use --dp with --pp")
    if args.pp <= 1 and args.microbatches is not None:
        p.error("--microbatches needs a pipeline: add --pp 2 (or more)")
    if args.pp > 1 and args.microbatches is None:
        args.microbatches = 2 * args.pp
    shards = args.dp * args.fsdp
    rows = shards * (args.microbatches or 1)
    if args.batch % rows:
        what = f"data size {shards}"
        if args.pp > 1:
            what += f" x {args.microbatches} microbatches"
        p.error(f"--batch {args.batch} must be a multiple of the {what} = {rows}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    n_devices = args.dp * args.fsdp * args.tp * args.pp
    # Both before JAX computes anything: glibc keeps XLA:CPU's per-step buffers
    # mapped instead of page-faulting them in every step; then the devices.
    tx.configure_allocator()
    tx.simulate_cpu_devices(max(n_devices, 1))

    data, source = load_text(args.text)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"data: {source}: {len(train_data):,} train, {len(val_data):,} val bytes")

    overrides = {"vocab_size": 256, "dropout": args.dropout}
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    config = GPTConfig.preset(args.preset, **overrides)
    block = args.block or config.block_size

    axes = {"data": args.dp * args.fsdp, "model": args.tp}
    if args.pp > 1:
        axes["pipe"] = args.pp
    mesh = tx.make_mesh(jax.devices()[:n_devices], **axes)
    plan = gpt_plans.plan_for(
        dp_size=args.dp,
        tp_size=args.tp,
        fsdp_size=args.fsdp,
        pp_size=args.pp,
        microbatches=args.microbatches,
        schedule=args.schedule,
    )
    # With a pipeline, the step runs the GPT as stages (embedding, blocks split over
    # `pipe`, head and loss); `gpt_loss` is then what `trainer.evaluate` computes.
    stage = gpt_plans.stage() if args.pp > 1 else None
    warmup = args.warmup if args.warmup is not None else max(args.steps // 10, 1)
    trainer = tx.Trainer(
        lambda key: GPT(config, key=key),  # created directly sharded
        plan,
        mesh=mesh,
        optimizer=tx.optim.adamw(
            args.lr,
            b2=0.99,
            weight_decay=0.1,
            clip_norm=1.0,
            warmup_steps=min(warmup, args.steps - 1),
            total_steps=args.steps,
            end_lr=args.lr / 10,
        ),
        loss=gpt_loss,
        loggers=[tx.loggers.Basic()],
        log_every=args.log_every,
        seed=args.seed,
        tokens_per_sample=block,
        flops_per_step=flops_per_token(config, block) * args.batch * block,
        stage=stage,
    )
    train = RandomWindows(train_data, args.batch, block, seed=args.seed)
    # Fixed evaluation batches, the same at every evaluation.
    evals = {
        name: [
            RandomWindows(split_data, args.batch, block, seed=10_000 + i).get(0)
            for i in range(args.eval_batches)
        ]
        for name, split_data in (("train", train_data), ("val", val_data))
    }

    def evaluate(step: int) -> dict[str, float]:
        losses = {n: trainer.evaluate(b)["loss"] for n, b in evals.items()}
        print(
            f"eval step {step} | train {losses['train']:.4f} | val {losses['val']:.4f}"
        )
        return losses

    losses = evaluate(0)
    done = 0
    while done < args.steps:
        chunk = min(args.eval_every, args.steps - done)
        trainer.fit(train.from_index(done), steps=done + chunk)  # steps: a total
        done += chunk
        losses = evaluate(done)

    state = trainer.state
    assert state is not None
    prompt = val_data[:16].astype(np.int32)[None]  # (1, 16)
    tokens = generate(
        state.model,
        jax.numpy.asarray(prompt),
        args.sample_tokens,
        jax.random.key(args.seed),
        temperature=0.8,
        top_k=40,
    )
    text = bytes(np.asarray(tokens[0]).astype(np.uint8)).decode("utf-8", "replace")
    print("sample:\n" + "-" * 72 + f"\n{text}\n" + "-" * 72)
    print(f"total time {time.perf_counter() - start:.1f} s")
    return losses


if __name__ == "__main__":
    main()
