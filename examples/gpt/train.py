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
1 MB of the `.py` files next to `os.py`, in sorted order: `tx.config.stdlib_text`),
which every machine that runs this script has. Tokens are bytes (vocabulary 256,
`tx.data.ByteTokenizer`); the first 90% trains, the last 10% validates. The
training batches come from a `tx.data.Pipeline` over every window of the training
bytes (`tx.data.TextWindows` with stride 1), shuffled: random contiguous windows,
as nanoGPT's `get_batch` draws them, deterministic in `--seed`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
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

TRAIN_SPAN, VAL_SPAN = (0.0, 0.9), (0.9, 1.0)  # fractions of the text's bytes
EVAL_SEED = 10_000  # the order of the evaluation batches, whatever --seed is


def byte_windows(
    text: str | None, block: int
) -> tuple[tx.data.TokenWindows, tx.data.TokenWindows, str]:
    """Training and validation windows of `block` bytes (and their next bytes) at
    every start position (stride 1, so a shuffled stream of them is nanoGPT's
    random windows), from the first 90% and the last 10% of `text`'s bytes, or of
    the standard library's sources when `text` is None; and the source's name."""
    if text is not None:
        train = tx.data.TextWindows(text, block, stride=1, span=TRAIN_SPAN)
        val = tx.data.TextWindows(text, block, stride=1, span=VAL_SPAN)
        return train, val, text
    tokens = np.frombuffer(tx.config.stdlib_text(), dtype=np.uint8)  # (bytes,)
    train = tx.data.TokenWindows(tokens, block, stride=1, span=TRAIN_SPAN)
    val = tx.data.TokenWindows(tokens, block, stride=1, span=VAL_SPAN)
    return train, val, "Python standard library sources"


def fixed_batches(
    windows: tx.data.TokenWindows, batch: int, count: int
) -> list[dict[str, np.ndarray]]:
    """`count` global batches of random windows (the start of a stream shuffled by
    `EVAL_SEED`): the same batches at every evaluation."""
    stream = tx.data.Pipeline(windows, batch, seed=EVAL_SEED)
    return [stream.global_batch(i * batch) for i in range(count)]


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
    for flag in ("steps", "eval_every", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
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

    overrides = {"vocab_size": 256, "dropout": args.dropout}
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    config = GPTConfig.preset(args.preset, **overrides)
    block = args.block or config.block_size
    train_windows, val_windows, source = byte_windows(args.text, block)
    print(
        f"data: {source}: {train_windows.num_tokens:,} train, "
        f"{val_windows.num_tokens:,} val bytes"
    )

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
    # Fixed evaluation batches of random windows, the same at every evaluation.
    evals = {
        name: fixed_batches(windows, args.batch, args.eval_batches)
        for name, windows in (("train", train_windows), ("val", val_windows))
    }
    losses: dict[str, float] = {}

    def evaluate(step: int) -> None:
        losses.update({n: trainer.evaluate(b)["loss"] for n, b in evals.items()})
        print(
            f"eval step {step} | train {losses['train']:.4f} | val {losses['val']:.4f}"
        )

    def evaluate_hook(step: int, metrics: dict, trainer: tx.Trainer) -> None:
        del metrics, trainer
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)

    # Hooks run at the Trainer's log steps (and after the last step): log at every
    # multiple of --log-every and of --eval-every, print the former.
    log_every = math.gcd(args.log_every, args.eval_every)
    printer = tx.loggers.Basic(
        every=None if log_every == args.log_every else args.log_every
    )
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
        loggers=[printer],
        log_every=log_every,
        hooks=[evaluate_hook],
        seed=args.seed,
        tokens_per_sample=block,
        flops_per_step=flops_per_token(config, block) * args.batch * block,
        stage=stage,
    )
    # Random windows: every epoch of all the windows is shuffled by (seed, epoch).
    # One `fit` reads the stream from its sample 0 to the end (it would resume at
    # `state.data_position` from a checkpoint); `steps` is a total.
    train = tx.data.Pipeline(train_windows, args.batch, seed=args.seed)
    evaluate(0)
    trainer.fit(train, steps=args.steps)

    state = trainer.state
    assert state is not None
    # The validation text's first 16 bytes: (1, 16).
    prompt = val_windows.tokens()[val_windows.start :][:16].astype(np.int32)[None]
    tokens = generate(
        state.model,
        jax.numpy.asarray(prompt),
        args.sample_tokens,
        jax.random.key(args.seed),
        temperature=0.8,
        top_k=40,
    )
    text = tx.data.ByteTokenizer().decode(tokens[0])
    print("sample:\n" + "-" * 72 + f"\n{text}\n" + "-" * 72)
    print(f"total time {time.perf_counter() - start:.1f} s")
    return losses


if __name__ == "__main__":
    main()
