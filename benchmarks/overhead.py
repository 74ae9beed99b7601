"""Trainer overhead: `tx.Trainer.fit` against a hand-written `jax.jit` loop.

Cases (`--cases`, comma-separated; default: all but `wide-dp8`):

- `tiny`: an MLP of `eqx.nn.Linear` 16-32-16, batch 32: dispatch-bound (host time).
- `wide`: `eqx.nn.Linear` 512-2048-2048-512, batch 32: compute-bound (memory passes
    over 6.3M parameters and their Adam moments).
- `gpt`: the baby GPT (`GPTConfig.preset("baby")`, 4 layers, 128 wide, context 64),
    batch 12; its step's scratch buffer is over 64 MiB (see jax-notes on malloc).
- `<case>-dp8`: the same model under DP over 8 simulated CPU devices (batch rounded
    up to a multiple of 8), `--dp-steps` steps per round. Run in a subprocess, since
    the device count must be set before JAX starts; `tiny-dp8` is in the default set.

Every loop takes the same host (numpy) batches, runs the same model, loss and
optimizer (`tx.optim.adamw(1e-3)`: Adam with the learning rate in its state), donates
its state, and returns what the Trainer's step reports: the loss, the gradients' global
norm (`optax.tree.norm`) and the loss's own metrics (`--discard-metrics` drops the
metrics). The Trainer's step also returns the learning rate and keeps its on-device
counters (step, data position, bad steps). The hand-written loop runs twice: placing
each batch with `jax.device_put` (pinned to the batch sharding), and passing the numpy
batch straight into the jitted step (jit's dispatch places it: faster for small
batches). The ratio is against the faster of the two.

Rounds alternate between the loops in one process, so machine noise hits all of
them; we report medians, and the median of the per-round ratios (each round's loops
run back to back: it cancels slow drifts). For each loop, where the step's time went:
host time per step (dispatch; the loop runs ahead of the device when it is smaller
than the step time), CPU time (user, system) and minor page faults per step (a step
whose scratch buffer glibc returns to the OS faults it back in every step), and the
compiled step's scratch (temp), argument and output bytes and FLOPs.

Run: `.venv/bin/python benchmarks/overhead.py [--cases tiny,wide,gpt,tiny-dp8]
[--rounds 21] [--steps 1000] [--wide-steps 10] [--gpt-steps 30] [--dp-steps 30]`
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import titanax as tx  # noqa: E402
from models.gpt import GPT, GPTConfig, gpt_loss  # noqa: E402

CASES = ("tiny", "wide", "gpt")
DEFAULT_CASES = ("tiny", "wide", "gpt", "tiny-dp8")
TRAINER = "tx.Trainer.fit"
HAND = ("hand-written, device_put", "hand-written, numpy into jit")


class LinearMLP(eqx.Module):
    """An MLP of `eqx.nn.Linear` layers (ReLU between), applied over a batch."""

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, sizes: tuple[int, ...], *, key: jax.Array):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(jax.vmap(layer)(x))
        return jax.vmap(self.layers[-1])(x)


def mse_loss(model: LinearMLP, batch: dict[str, jax.Array], key: Any) -> Any:
    error = model(batch["x"]) - batch["y"]
    return jnp.mean(error**2), {"mae": jnp.mean(jnp.abs(error))}


@dataclass
class Case:
    name: str
    title: str
    model: Any
    loss: Callable[..., Any]
    batches: list[dict[str, np.ndarray]]
    steps: int
    devices: int


def case_devices(name: str) -> int:
    """The device count a case name asks for (`wide-dp8`: 8)."""
    base, _, dp = name.partition("-dp")
    if base not in CASES or not (dp == "" or dp.isdigit() and int(dp) > 1):
        raise SystemExit(
            f"unknown case {name!r}: expected one of {', '.join(CASES)}, optionally "
            "with a -dpN suffix (N > 1 simulated devices), e.g. tiny-dp8"
        )
    return int(dp) if dp else 1


def build_case(name: str, args: argparse.Namespace) -> Case:
    base = name.partition("-dp")[0]
    devices = case_devices(name)
    rng = np.random.default_rng(0)

    def rows(n: int) -> int:  # the batch, rounded up to a multiple of the devices
        return -(-n // devices) * devices

    if base in ("tiny", "wide"):
        sizes = (16, 32, 16) if base == "tiny" else (512, 2048, 2048, 512)
        b = rows(32)
        batches = [
            {
                "x": rng.normal(size=(b, sizes[0])).astype(np.float32),
                "y": rng.normal(size=(b, sizes[-1])).astype(np.float32),
            }
            for _ in range(4)
        ]
        model = LinearMLP(sizes, key=jax.random.key(0))
        kind = "dispatch-bound" if base == "tiny" else "compute-bound"
        title = f"{base} MLP {'-'.join(map(str, sizes))}, batch {b} ({kind})"
        steps = args.steps if base == "tiny" else args.wide_steps
        case = Case(name, title, model, mse_loss, batches, steps, devices)
    else:
        config = GPTConfig.preset("baby")
        b = rows(12)
        batches = []
        for _ in range(4):
            tokens = rng.integers(0, config.vocab_size, size=(b, config.block_size + 1))
            batches.append(
                {
                    "x": tokens[:, :-1].astype(np.int32),
                    "y": tokens[:, 1:].astype(np.int32),
                }
            )
        model = GPT(config, key=jax.random.key(0))
        title = f"baby GPT (4L, 128 wide, ctx 64), batch {b}"
        case = Case(name, title, model, gpt_loss, batches, args.gpt_steps, devices)
    if devices > 1:
        case.title += f", DP={devices} simulated CPU devices"
        case.steps = args.dp_steps
    return case


def _mesh(devices: int) -> Any:
    return tx.make_mesh(jax.devices()[:devices], data=devices)


def hand_written(case: Case, optimizer, device_put: bool, keep_metrics: bool):
    """The loop a careful JAX user writes: jit over (params, opt_state), donated,
    returning the loss, the gradients' global norm and the loss's metrics."""
    mesh = _mesh(case.devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec("data"))
    params, static = eqx.partition(case.model, eqx.is_array)
    params = jax.device_put(jax.tree.map(jnp.copy, params), replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)

    def step(params, opt_state, batch):
        def objective(p):
            out = case.loss(eqx.combine(p, static), batch, None)
            return out if isinstance(out, tuple) else (out, {})

        (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        out = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        if keep_metrics:
            out.update(metrics)
        return optax.apply_updates(params, updates), opt_state, out

    jitted = jax.jit(
        step,
        in_shardings=(replicated, replicated, rows),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(0, 1),
    )
    state = [params, opt_state]

    def run(steps: int) -> list[Mark]:
        params, opt_state = state
        marks = [Mark.now()]
        for i in range(steps):
            batch = case.batches[i % len(case.batches)]
            if device_put:
                batch = jax.device_put(batch, rows)
            params, opt_state, out = jitted(params, opt_state, batch)
        marks.append(Mark.now())
        jax.block_until_ready(out)
        marks.append(Mark.now())
        state[:] = [params, opt_state]
        return marks

    run(1)  # compile
    compiled = jitted.lower(*state, case.batches[0]).compile()
    return run, compiled


def titanax_loop(case: Case, optimizer):
    end = _EndMark()
    trainer = tx.Trainer(
        case.model,
        tx.Plan(dp=tx.DP("data")),
        optimizer=optimizer,
        loss=case.loss,
        mesh=_mesh(case.devices),
        loggers=[end],
        # The log at the last step of each round fetches its metrics: the end of
        # the round (`fit`'s own wind-down is left out, as its set-up is).
        log_every=case.steps,
    )
    # Compile, and take `case.steps` steps so that rounds end on log steps.
    state = trainer.fit(_cycle(case.batches, case.steps, []), epochs=1)

    def run(steps: int) -> list[Mark]:
        # One pass over `steps` batches: the same under `steps` as a count or a total.
        marks: list[Mark] = []
        trainer.fit(_cycle(case.batches, steps, marks), epochs=1)
        return [*marks, end.mark]

    compiled = trainer.train_step.lower(state, case.batches[0]).compile()
    return run, compiled


def _cycle(batches, n, marks):
    """`n` batches, marking the first request (after `fit`'s set-up) and the request
    for batch n + 1, which the loop makes right after dispatching step n."""
    marks.append(Mark.now())
    for i in range(n):
        yield batches[i % len(batches)]
    marks.append(Mark.now())


class _EndMark:
    """A Titanax logger that marks when the metrics of a log step reached the host."""

    mark: Mark

    def header(self, info: Any) -> None:
        pass

    def log(self, step: int, metrics: Any) -> None:
        self.mark = Mark.now()

    def close(self) -> None:
        pass


@dataclass
class Mark:
    """A point in a round: wall time and the process's CPU times and page faults."""

    time: float
    user: float
    sys: float
    faults: int

    @classmethod
    def now(cls) -> Mark:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt)


@dataclass
class Sample:
    step_s: float  # wall time per step
    host_s: float  # time to dispatch, per step
    user_s: float  # process CPU time per step (all threads)
    sys_s: float
    faults: float  # minor page faults per step


def timed(run: Callable[[int], list[Mark]], steps: int) -> Sample:
    """One round of `steps` steps, from the first dispatch (the loop's set-up left
    out) to the moment the last step's outputs are ready."""
    start, host, end = run(steps)
    return Sample(
        (end.time - start.time) / steps,
        (host.time - start.time) / steps,
        (end.user - start.user) / steps,
        (end.sys - start.sys) / steps,
        (end.faults - start.faults) / steps,
    )


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _compiled_stats(compiled: Any) -> str:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mib = 2**20
    return (
        f"temp {memory.temp_size_in_bytes / mib:.2f} MiB, "
        f"arguments {memory.argument_size_in_bytes / mib:.2f} MiB, "
        f"outputs {memory.output_size_in_bytes / mib:.2f} MiB, "
        f"{cost.get('flops', 0.0) / 1e9:.3f} GFLOP"
    )


def measure(case: Case, rounds: int, keep_metrics: bool = True) -> float:
    optimizer = tx.optim.adamw(1e-3)
    loops = {
        HAND[0]: hand_written(case, optimizer, True, keep_metrics),
        HAND[1]: hand_written(case, optimizer, False, keep_metrics),
        TRAINER: titanax_loop(case, optimizer),
    }
    load_before = _load()
    samples: dict[str, list[Sample]] = {k: [] for k in loops}
    for _ in range(rounds):
        for label, (run, _) in loops.items():
            samples[label].append(timed(run, case.steps))

    def med(label: str, field: str) -> float:
        return statistics.median(getattr(s, field) for s in samples[label])

    best = min(HAND, key=lambda k: med(k, "step_s"))
    ratio = med(TRAINER, "step_s") / med(best, "step_s")
    # Each round runs all loops back to back, so a per-round ratio cancels the
    # machine's slow drifts (other tenants); its median is the steadier estimate.
    pairs = list(zip(samples[TRAINER], samples[best], strict=True))
    paired = statistics.median(t.step_s / h.step_s for t, h in pairs)
    # CPU time (all threads) counts work, not waiting: steadier on a shared machine.
    cpu = statistics.median(
        (t.user_s + t.sys_s) / (h.user_s + h.sys_s) for t, h in pairs
    )
    print(f"\n### {case.title}\n")
    print(
        f"{rounds} rounds of {case.steps} steps; load average {load_before} before, "
        f"{_load()} after\n"
    )
    print(
        "| loop | median ms/step | min | max | host ms/step | user ms/step | "
        "sys ms/step | page faults/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label in loops:
        steps_ms = [s.step_s * 1e3 for s in samples[label]]
        print(
            f"| {label} | {statistics.median(steps_ms):.3f} | {min(steps_ms):.3f} | "
            f"{max(steps_ms):.3f} | {med(label, 'host_s') * 1e3:.3f} | "
            f"{med(label, 'user_s') * 1e3:.2f} | {med(label, 'sys_s') * 1e3:.2f} | "
            f"{med(label, 'faults'):.0f} |"
        )
    print(
        f"\nratio Trainer / fastest hand-written ({best}): medians {ratio:.3f}, "
        f"median of per-round ratios **{paired:.3f}**; of CPU time (user + sys) "
        f"{cpu:.3f}"
    )
    for label in (HAND[1], TRAINER):
        print(f"compiled step ({label}): {_compiled_stats(loops[label][1])}")
    return paired


def _in_subprocess(case: str, devices: int, argv: list[str]) -> float:
    """Run one case in a fresh process with `devices` CPU devices; its ratio."""
    command = [sys.executable, __file__, *argv, "--cases", case]
    command += ["--devices", str(devices)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    print(result.stdout, end="", flush=True)
    return float(result.stdout.rsplit("per-round ratios **", 1)[1].split("*")[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=1000, help="tiny MLP steps")
    parser.add_argument("--wide-steps", type=int, default=10)
    parser.add_argument("--gpt-steps", type=int, default=30)
    parser.add_argument(
        "--dp-steps",
        type=int,
        default=30,
        help="steps per round of the -dpN cases (more than ~32 queued steps with "
        "collectives can deadlock XLA:CPU when nothing bounds the queue)",
    )
    parser.add_argument(
        "--discard-metrics",
        action="store_true",
        help="the hand-written loops drop the loss's metrics (XLA then skips them)",
    )
    parser.add_argument(
        "--devices", type=int, default=1, help=argparse.SUPPRESS
    )  # set by the parent process for the -dp cases
    args = parser.parse_args()
    if args.devices > 1:
        tx.simulate_cpu_devices(args.devices)
    names = [c for c in args.cases.split(",") if c]
    forwarded = [
        f"--rounds={args.rounds}",
        f"--steps={args.steps}",
        f"--wide-steps={args.wide_steps}",
        f"--gpt-steps={args.gpt_steps}",
        f"--dp-steps={args.dp_steps}",
        *(["--discard-metrics"] if args.discard_metrics else []),
    ]
    if args.devices == 1:
        print(f"jax {jax.__version__}, titanax at {Path(__file__).parents[1]}")
    ratios: dict[str, float] = {}
    for name in names:
        devices = case_devices(name)
        if devices != args.devices:
            ratios[name] = _in_subprocess(name, devices, forwarded)
            continue
        case = build_case(name, args)
        ratios[name] = measure(case, args.rounds, not args.discard_metrics)
    if args.devices == 1:
        print("\n| case | Trainer / hand-written (median of per-round ratios) |")
        print("|---|---|")
        for name, value in ratios.items():
            print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
