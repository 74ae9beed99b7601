"""Input pipeline throughput against the training step, and the cost of a resume.

For three `titanax.data` pipelines and the training step each one feeds (on 8
simulated CPU devices):

- GPT windows of tinyshakespeare (`TextWindows`, window 64, batch 12; about 15,700
  windows, so epochs are numpy permutations), feeding the `baby` GPT under
  DP=2 x TP=4 (what `make demo` trains). Skipped, with the reason, when the file is
  absent.
- GPT windows of a synthetic 2**24-token `uint16` file (`TokenWindows`, 262,143
  windows: epochs are Grain index shuffles), feeding the same step.
- MNIST-like arrays (`ArraySource`, 60,000 x 28 x 28 float32, batch 40), feeding
  the MNIST example's MLP (784-128-10) under DP=8.

it measures:

- **pipeline**: samples/s of the pipeline alone (this process's rows of each global
  batch, all rows with one process), reading on demand (`num_threads=0`) and with
  the default read-ahead (2 threads, 4 batches);
- **step**: samples/s the compiled step consumes (a fixed host batch, `step(state,
  batch)` dispatched back to back);
- **loop**: the step fed by the pipeline: ms per step the host spends waiting in
  `next(batches)` (0 when the loader is never what the step waits on), and the loop's
  samples/s;
- **resume**: the time from `pipeline.batches(start)` to its first batch at
  `start = 10**6` and at `start = 0` (O(1): equal up to noise).

Run (from the repository root):

```
python benchmarks/data.py --text ../shared/data/tinyshakespeare.txt
python benchmarks/data.py --quick        # a short check: few batches, one repeat
```

Prints a Markdown table and the command line. Medians over `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESUME_AT = 10**6


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="tinyshakespeare.txt")
    p.add_argument("--batches", type=int, default=300, help="batches per pipeline run")
    p.add_argument("--steps", type=int, default=40, help="steps per loop run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="30 batches, 5 steps, once")
    args = p.parse_args()
    if args.quick:
        args.batches, args.steps, args.repeat = 30, 5, 1
    return args


def main() -> None:
    args = parse()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import titanax as tx

    tx.simulate_cpu_devices(8)
    import jax
    import numpy as np

    from models import gpt_plans
    from models.gpt import GPT, GPTConfig, gpt_loss
    from models.mlp import MLP, cross_entropy_loss

    med = statistics.median

    def pipeline_rate(make: Callable[[], Any], plan: Any, mesh: Any) -> float:
        """Samples/s of the pipeline alone (median over repeats)."""
        rates = []
        for _ in range(args.repeat):
            pipeline = make()
            with pipeline.batches(0, plan, mesh) as batches:
                next(batches)  # threads started, first batch read
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    next(batches)
                rates.append(args.batches * pipeline.global_batch_size)
                rates[-1] /= time.perf_counter() - t0
        return med(rates)

    def resume_ms(make: Callable[[], Any], plan: Any, mesh: Any, start: int) -> float:
        times = []
        for _ in range(max(args.repeat, 3)):
            pipeline = make()
            t0 = time.perf_counter()
            with pipeline.batches(start, plan, mesh) as batches:
                next(batches)
                times.append(time.perf_counter() - t0)
        return med(times) * 1e3

    def step_and_loop(
        train: Any, state: Any, make: Callable[[], Any], plan: Any, mesh: Any
    ) -> tuple[float, float, float, Any]:
        """(step samples/s on a fixed batch, loop samples/s fed by the pipeline,
        ms per step waiting in `next`, state)."""
        pipeline = make()
        rows = pipeline.global_batch_size
        fixed = pipeline.global_batch(0)
        state, metrics = train.step(state, fixed)  # compile
        jax.block_until_ready(metrics)
        step_rates, loop_rates, waits = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = train.step(state, fixed)
            jax.block_until_ready(metrics)
            step_rates.append(args.steps * rows / (time.perf_counter() - t0))

            with make().batches(0, plan, mesh) as batches:
                state, metrics = train.step(state, next(batches))  # threads started
                jax.block_until_ready(metrics)
                waited = 0.0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    w0 = time.perf_counter()
                    batch = next(batches)
                    waited += time.perf_counter() - w0
                    state, metrics = train.step(state, batch)
                jax.block_until_ready(metrics)
                loop_rates.append(args.steps * rows / (time.perf_counter() - t0))
                waits.append(waited / args.steps * 1e3)
        return med(step_rates), med(loop_rates), med(waits), state

    results: list[tuple[str, dict[str, Any]]] = []

    # --- the GPT: baby preset, DP=2 x TP=4 ------------------------------------------
    config = GPTConfig.preset("baby")
    block, gpt_batch = config.block_size, 12
    gpt_mesh = tx.make_mesh(data=2, model=4)
    gpt_plan = gpt_plans.plan_for(dp_size=2, tp_size=4)
    gpt_train = tx.make_train_step(gpt_loss, tx.optim.adamw(1e-3), gpt_plan, gpt_mesh)
    gpt_state = gpt_train.init(lambda key: GPT(config, key=key), 0)

    gpt_sources: list[tuple[str, Callable[[], Any]]] = []
    text = Path(args.text)
    if text.is_file():
        gpt_sources.append(
            (
                f"GPT windows, {text.name}",
                lambda: tx.data.TextWindows(text, block, span=(0.0, 0.9)),
            )
        )
    else:
        print(
            f"skipped: GPT windows of tinyshakespeare: {text} is absent (it lives "
            "in the sibling `shared/` checkout; pass --text PATH)."
        )
    token_file = Path(tempfile.mkdtemp(prefix="titanax-bench-data-")) / "train.bin"
    rng = np.random.default_rng(0)
    rng.integers(0, 256, 2**24, dtype=np.uint16).tofile(token_file)
    gpt_sources.append(
        (
            "GPT windows, synthetic 2^24-token uint16 file",
            lambda: tx.data.TokenWindows(token_file, block, dtype=np.uint16),
        )
    )
    for name, source in gpt_sources:
        first = source()
        sync = pipeline_rate(
            lambda s=source: tx.data.Pipeline(s(), gpt_batch, num_threads=0),
            gpt_plan,
            gpt_mesh,
        )

        def make(s=source):
            return tx.data.Pipeline(s(), gpt_batch)

        step, loop, wait, gpt_state = step_and_loop(
            gpt_train, gpt_state, make, gpt_plan, gpt_mesh
        )
        results.append(
            (
                name,
                {
                    "samples": len(first),
                    "order": make().metadata()["order"],
                    "batch": gpt_batch,
                    "layout": "DP=2 x TP=4",
                    "sync": sync,
                    "threads": pipeline_rate(make, gpt_plan, gpt_mesh),
                    "step": step,
                    "loop": loop,
                    "wait": wait,
                    "resume": resume_ms(make, gpt_plan, gpt_mesh, RESUME_AT),
                    "start": resume_ms(make, gpt_plan, gpt_mesh, 0),
                },
            )
        )

    # --- MNIST-like arrays: the example's MLP, DP=8 ---------------------------------
    images = rng.standard_normal((60_000, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 60_000).astype(np.int32)
    mnist_batch = 40
    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(dp=tx.DP("data"))
    train = tx.make_train_step(cross_entropy_loss, tx.optim.adamw(3e-3), plan, mesh)
    state = train.init(lambda key: MLP(28 * 28, 10, hidden_sizes=(128,), key=key), 0)

    def make_mnist(threads: int = 2) -> Any:
        return tx.data.Pipeline(
            {"x": images, "y": labels}, mnist_batch, num_threads=threads
        )

    step, loop, wait, state = step_and_loop(train, state, make_mnist, plan, mesh)
    results.append(
        (
            "MNIST-like arrays, 60,000 x 28 x 28",
            {
                "samples": len(labels),
                "order": make_mnist().metadata()["order"],
                "batch": mnist_batch,
                "layout": "DP=8",
                "sync": pipeline_rate(lambda: make_mnist(0), plan, mesh),
                "threads": pipeline_rate(make_mnist, plan, mesh),
                "step": step,
                "loop": loop,
                "wait": wait,
                "resume": resume_ms(make_mnist, plan, mesh, RESUME_AT),
                "start": resume_ms(make_mnist, plan, mesh, 0),
            },
        )
    )
    token_file.unlink()

    print(
        f"\n{jax.device_count()} {jax.default_backend()} devices, "
        f"{os.cpu_count()} host cores; medians of {args.repeat}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print(
        "| pipeline | samples (order) | batch, layout | pipeline, on demand "
        "(samples/s) | pipeline, 2 threads | step consumes (samples/s) | headroom "
        "| loop (samples/s) | waited in `next` (ms/step) | first batch at 10^6 / "
        "at 0 (ms) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results:
        print(
            f"| {name} | {r['samples']:,} ({r['order']}) | {r['batch']}, "
            f"{r['layout']} | {r['sync']:,.0f} | {r['threads']:,.0f} | "
            f"{r['step']:,.0f} | {r['threads'] / r['step']:.1f}x | "
            f"{r['loop']:,.0f} | {r['wait']:.2f} | {r['resume']:.1f} / "
            f"{r['start']:.1f} |"
        )
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
