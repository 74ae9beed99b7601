"""Context length against memory per device: the GPT's training step at CP=1 and CP=N.

For each global context `T` in `--contexts`, compiles one training step (AdamW) of a
GPT (`--preset`, `--layers`) with a global batch of `--batch` rows on one device
and under `tx.CP` over `N` = each of `--cp` devices (simulated CPU devices), and
prints per device, from the compiled step's `memory_analysis()`:

- `temp`: XLA's scratch buffer, where the activations kept for the backward pass
  and every intermediate live (the bytes context parallelism divides);
- `args`: the step's inputs (parameters, optimizer state, the batch), the same at
  every `N` except the batch, since parameters are replicated over `context`;
- the ratio of `temp` to CP=1's at the same `T`.

Nothing runs; only compiles (XLA:CPU). Example:

    python benchmarks/context.py --contexts 256,512,1024,2048 --cp 2,4,8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `models/` lives at the repository root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="256,512,1024,2048")
    p.add_argument("--cp", default="2,4,8", help="context-parallel sizes")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="global batch (rows)")
    p.add_argument("--attention", default="ring", choices=["ring", "all_gather"])
    args = p.parse_args(argv)
    contexts = [int(t) for t in args.contexts.split(",")]
    sizes = [int(n) for n in args.cp.split(",")]

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import optax

    import titanax as tx
    from models.gpt import GPT, GPTConfig, gpt_loss

    tx.simulate_cpu_devices(max(sizes))
    mib = 2**20
    print(
        f"GPT preset {args.preset}, {args.layers} layers, batch {args.batch}, "
        f"{args.attention} attention; bytes per device from memory_analysis()"
    )
    print("| context T | CP | temp MiB | args MiB | temp / CP=1 | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for T in contexts:
        base = GPTConfig.preset(
            args.preset, n_layer=args.layers, block_size=T, unroll=False
        )
        rng = np.random.default_rng(0)
        x = rng.integers(0, base.vocab_size, (args.batch, T + 1)).astype(np.int32)
        batch = {"x": x[:, :-1], "y": x[:, 1:]}
        reference = None
        for n in [1, *sizes]:
            if T % (2 * n):
                print(f"| {T} | {n} | (T not a multiple of {2 * n}) | | | |")
                continue
            start = time.perf_counter()
            if n == 1:
                plan = tx.Plan()
                mesh = tx.make_mesh(jax.devices()[:1], data=1)
                config = base
            else:
                plan = tx.Plan(cp=tx.CP("context", attention=args.attention))
                mesh = tx.make_mesh(jax.devices()[:n], context=n)
                config = dataclasses.replace(base, layout=tx.Activations(plan, mesh))
            step = tx.make_train_step(gpt_loss, optax.adamw(1e-3), plan, mesh)
            state = step.init(lambda k, c=config: GPT(c, key=k), 0)
            memory = step.lower(state, batch).compile().memory_analysis()
            temp, argb = memory.temp_size_in_bytes, memory.argument_size_in_bytes
            reference = temp if n == 1 else reference
            ratio = f"{temp / reference:.3f}" if reference else "-"
            print(
                f"| {T} | {n} | {temp / mib:.2f} | {argb / mib:.2f} | {ratio} | "
                f"{time.perf_counter() - start:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
