"""Trainer overhead: `tx.Trainer.fit` against a hand-written `jax.jit` loop.

All loops take the same host (numpy) batches, place them on the device each step,
run the same model, loss and optimizer, and donate their state. The hand-written loop
runs twice: placing each batch with `jax.device_put`, and passing the numpy batch
straight into the jitted step (jit's dispatch places it: faster for small batches).
The ratio is against the faster of the two. Rounds alternate between the loops in one
process, so machine noise hits all of them; we report medians, and the median of the
per-round ratios (each round's loops run back to back: it cancels slow drifts).

Run: `.venv/bin/python benchmarks/overhead.py [--rounds 21] [--steps 1000]`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import titanax as tx  # noqa: E402
from models.gpt import GPT, GPTConfig, gpt_loss  # noqa: E402
from models.mlp import MLP, cross_entropy_loss  # noqa: E402


def mlp_case(rng: np.random.Generator):
    model = MLP(32, 10, hidden_sizes=(64,), key=jax.random.key(0))
    batches = [
        {
            "x": rng.normal(size=(64, 32)).astype(np.float32),
            "y": rng.integers(0, 10, size=(64,)).astype(np.int32),
        }
        for _ in range(8)
    ]
    return "tiny MLP 32-64-10, batch 64", model, cross_entropy_loss, batches


def gpt_case(rng: np.random.Generator):
    config = GPTConfig.preset("baby")
    model = GPT(config, key=jax.random.key(0))
    batches = []
    for _ in range(4):
        tokens = rng.integers(0, config.vocab_size, size=(12, config.block_size + 1))
        batches.append(
            {"x": tokens[:, :-1].astype(np.int32), "y": tokens[:, 1:].astype(np.int32)}
        )
    return "baby GPT (4L, 128 wide, ctx 64), batch 12", model, gpt_loss, batches


def hand_written(
    model, loss, optimizer, batches, steps, device_put=True, keep_metrics=True
):
    """The loop a careful JAX user writes: jit over (params, opt_state), donated."""
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)

    def step(params, opt_state, batch):
        # By default the loss's own metrics (the MLP's accuracy) are returned, as
        # the Trainer does; its extra work is then the gradient norm and counters.
        def objective(p):
            out = loss(eqx.combine(p, static), batch, None)
            return out if isinstance(out, tuple) else (out, {})

        (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        out = (value, metrics) if keep_metrics else value
        return optax.apply_updates(params, updates), opt_state, out

    step = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state, out = step(params, opt_state, batches[0])  # compile
    jax.block_until_ready(out)

    def run():
        nonlocal params, opt_state
        start = time.perf_counter()
        for i in range(steps):
            batch = batches[i % len(batches)]
            if device_put:
                batch = jax.device_put(batch)
            params, opt_state, out = step(params, opt_state, batch)
        host = time.perf_counter() - start
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / steps, host / steps

    return run


def titanax_loop(model, loss, optimizer, batches, steps):
    mesh = tx.make_mesh(jax.devices()[:1], data=1)
    trainer = tx.Trainer(
        model,
        tx.Plan(dp=tx.DP()),
        optimizer=optimizer,
        loss=loss,
        mesh=mesh,
        log_every=10**9,
    )
    trainer.fit(batches, steps=2)  # compile

    def run():
        dispatched: list[float] = []
        start = time.perf_counter()
        state = trainer.fit(_cycle(batches, steps, dispatched), steps=steps)
        jax.block_until_ready(state.model)
        host = (dispatched[0] - start) / steps
        return (time.perf_counter() - start) / steps, host

    return run


def _cycle(batches, n, dispatched):
    """`n` batches; then notes the time: the loop asks for batch n + 1 right after
    dispatching step n, so that is the host's time for all n steps."""
    for i in range(n):
        yield batches[i % len(batches)]
    dispatched.append(time.perf_counter())


def measure(case, rounds, steps, keep_metrics=True):
    name, model, loss, batches = case
    optimizer = optax.adamw(1e-3)
    hand = ("hand-written, device_put", "hand-written, numpy into jit")
    runs = {
        hand[0]: hand_written(
            model, loss, optimizer, batches, steps, keep_metrics=keep_metrics
        ),
        hand[1]: hand_written(
            model, loss, optimizer, batches, steps, False, keep_metrics
        ),
        "tx.Trainer.fit": titanax_loop(model, loss, optimizer, batches, steps),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    host: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            per_step, host_per_step = run()
            times[label].append(per_step)
            host[label].append(host_per_step)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min(hand, key=lambda k: med[k])
    ratio = med["tx.Trainer.fit"] / med[best]
    # Each round runs all loops back to back, so a per-round ratio cancels the
    # machine's slow drifts (other tenants); its median is the steadier estimate.
    paired = statistics.median(
        t / h for t, h in zip(times["tx.Trainer.fit"], times[best], strict=True)
    )
    print(f"\n### {name}\n")
    print("| loop | median ms/step | min | max |")
    print("|---|---|---|---|")
    for label, values in times.items():
        print(
            f"| {label} | {med[label] * 1e3:.3f} | {min(values) * 1e3:.3f} | "
            f"{max(values) * 1e3:.3f} |"
        )
    print(
        f"\nratio Trainer / fastest hand-written ({best}): medians {ratio:.3f}, "
        f"median of per-round ratios **{paired:.3f}**"
    )
    for label in (*hand, "tx.Trainer.fit"):
        print(
            f"host time per step while the device computes ({label}): "
            f"{statistics.median(host[label]) * 1e3:.3f} ms of "
            f"{med[label] * 1e3:.3f} ms"
        )
    return paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--gpt-steps", type=int, default=15)
    parser.add_argument(
        "--discard-metrics",
        action="store_true",
        help="the hand-written loops drop the loss's metrics (XLA then skips them)",
    )
    args = parser.parse_args()
    keep = not args.discard_metrics
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    rng = np.random.default_rng(0)
    measure(mlp_case(rng), args.rounds, args.steps, keep)
    measure(gpt_case(rng), args.rounds, args.gpt_steps, keep)


if __name__ == "__main__":
    main()
