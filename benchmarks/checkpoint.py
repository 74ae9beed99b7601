"""Checkpoint throughput, integrity and failure-check costs, and a kill-9 fuzz.

Measures, for a ~100 MB TrainState (an MLP's weights and AdamW's two moments) laid
out by a plan on (simulated) devices:

- save and restore throughput (MB/s) of `tx.OrbaxCheckpoint` against raw Orbax calls
  (`CheckpointManager` + `StandardSave`/`StandardRestore` on the same arrays);
- what integrity costs: computing every array's fingerprint (saved with it; MB/s),
  and restore throughput with and without checking them (`restore(verify=...)`);
- the first save in a process (one-time setup included) for both;
- the time `save()` blocks the training loop once the step's arrays are ready
  (async: until they are fingerprinted, copied to host memory and the write is
  scheduled) as a fraction of one step; and, all included (waiting for the step,
  losing the dispatch-ahead, the background write competing for the CPU), the loop
  time added per save and the slowdown with a save every `--save-every` steps;
- the per-step checks a training loop makes: `raise_if_failed()` and
  `PreemptionGuard.should_stop(step)` (one process), in microseconds.

`--fuzz N` instead runs the kill-9 fuzz of `tests/_kill_fuzz.py` with N SIGKILLs
(the test runs 8) and prints its report.

Run:

```
python benchmarks/checkpoint.py                 # 8 simulated CPU devices, FSDP
python benchmarks/checkpoint.py --devices 1 --plan single
python benchmarks/checkpoint.py --hidden 512 --repeat 1 --steps 10   # short check
python benchmarks/checkpoint.py --fuzz 60       # the long kill-9 fuzz
```

Prints a Markdown table and the command line. Medians over `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--plan", choices=["fsdp", "dp", "dp_tp", "single"], default="fsdp")
    p.add_argument("--hidden", type=int, default=2048, help="MLP width (3 layers)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="loop steps per timing")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--dir", default=None, help="where to write (default: a tmp dir)")
    p.add_argument("--fuzz", type=int, default=None, help="run the kill-9 fuzz")
    return p.parse_args()


def run_fuzz(kills: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _kill_fuzz import fuzz

    with tempfile.TemporaryDirectory(prefix="titanax-fuzz-") as tmp:
        print(fuzz(kills, Path(tmp)))
    print(f"command: python benchmarks/checkpoint.py --fuzz {kills}")


def per_call_us(fn, calls: int = 200_000) -> float:
    """Median over 5 rounds of the time of one call of `fn`, in microseconds."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for n in range(calls):
            fn(n)
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    args = parse()
    if args.fuzz is not None:
        run_fuzz(args.fuzz)
        return
    on_cpu = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"
    import jax

    if on_cpu and args.devices > 1:
        from titanax._mesh import simulate_cpu_devices

        simulate_cpu_devices(args.devices)

    import equinox as eqx
    import numpy as np
    import orbax.checkpoint as ocp

    from models.mlp import MLP, cross_entropy_loss
    from titanax._mesh import make_mesh
    from titanax._plan import DP, FSDP, TP, Plan
    from titanax.checkpoint import OrbaxCheckpoint, PreemptionGuard, fingerprints
    from titanax.optim import adamw
    from titanax.train import abstract_state, make_train_step

    n = len(jax.devices())
    if args.plan == "fsdp":
        plan, mesh = Plan(fsdp=FSDP("data", min_size=0)), make_mesh(data=n)
    elif args.plan == "dp":
        plan, mesh = Plan(dp=DP("data")), make_mesh(data=n)
    elif args.plan == "dp_tp":
        plan = Plan(dp=DP("data"), tp=TP("model"))
        mesh = make_mesh(data=max(n // 4, 1), model=min(n, 4))
    else:
        plan, mesh = Plan(), make_mesh(jax.devices()[:1], data=1)

    width = args.hidden

    def make_model(key):
        return MLP(256, 16, (width, width, width), key=key)

    optimizer = adamw(1e-3)
    train = make_train_step(cross_entropy_loss, optimizer, plan, mesh)
    state = train.init(make_model, 0)
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.standard_normal((args.batch, 256)).astype(np.float32),
        "y": rng.integers(0, 16, args.batch).astype(np.int32),
    }
    state, _ = train.step(state, batch)  # compile (and donate the initial state)
    jax.block_until_ready(state)
    arrays = eqx.filter(state, eqx.is_array)  # not donated until the loop below
    mbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(arrays)) / 2**20
    target = abstract_state(make_model, plan, mesh, optimizer)
    abstract_arrays = eqx.filter(target, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    root = Path(args.dir or tempfile.mkdtemp(prefix="titanax-bench-ckpt-"))
    shutil.rmtree(root, ignore_errors=True)

    def fresh(name: str) -> Path:
        path = root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    # --- integrity: fingerprints ----------------------------------------------------
    leaves = jax.tree.leaves(arrays)
    fingerprints(leaves)  # compile
    fp_times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fingerprints(leaves)
        fp_times.append(time.perf_counter() - t0)

    # --- Titanax --------------------------------------------------------------------
    tx_first, tx_save, tx_restore, tx_unverified = [], [], [], []
    for r in range(args.repeat + 1):
        ckpt = OrbaxCheckpoint(fresh(f"tx{r}"), keep=None)
        t0 = time.perf_counter()
        ckpt.save(state, step=1, force=True, plan=plan, mesh=mesh)
        ckpt.wait()
        (tx_first if r == 0 else tx_save).append(time.perf_counter() - t0)
        if r:
            for verify, times in ((True, tx_restore), (False, tx_unverified)):
                t0 = time.perf_counter()
                restored = ckpt.restore(target, step=1, verify=verify)
                jax.block_until_ready(restored)
                times.append(time.perf_counter() - t0)
                del restored
        ckpt.close()

    # --- raw Orbax (defaults) -------------------------------------------------------
    ox_first, ox_save, ox_restore = [], [], []
    for r in range(args.repeat + 1):
        mngr = ocp.CheckpointManager(fresh(f"ocp{r}"))
        t0 = time.perf_counter()
        mngr.save(1, args=ocp.args.StandardSave(arrays))
        mngr.wait_until_finished()
        (ox_first if r == 0 else ox_save).append(time.perf_counter() - t0)
        if r:
            t0 = time.perf_counter()
            restored = mngr.restore(1, args=ocp.args.StandardRestore(abstract_arrays))
            jax.block_until_ready(restored)
            ox_restore.append(time.perf_counter() - t0)
            del restored
        mngr.close()

    # --- the training loop with and without asynchronous saves ----------------------
    def loop(ckpt: OrbaxCheckpoint | None) -> tuple[float, list[float]]:
        nonlocal state
        blocked = []
        step = int(state.step)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = train.step(state, batch)
            step += 1
            if ckpt is not None and ckpt.should_save(step):
                # Saving needs this step's values: the host waits for the device
                # first (counted in the loop's time, not in `blocked`).
                jax.block_until_ready(state)
                s0 = time.perf_counter()
                ckpt.save(state, step=step, plan=plan, mesh=mesh)
                blocked.append(time.perf_counter() - s0)
        jax.block_until_ready(state)
        if ckpt is not None:
            ckpt.wait()
        return time.perf_counter() - t0, blocked

    plain, with_saves, blocked = [], [], []
    for r in range(args.repeat):
        plain.append(loop(None)[0])
        ckpt = OrbaxCheckpoint(fresh(f"loop{r}"), keep=2, every=args.save_every)
        total, b = loop(ckpt)
        ckpt.close()
        with_saves.append(total)
        blocked.extend(b)

    # --- per-step checks -------------------------------------------------------------
    ckpt = OrbaxCheckpoint(fresh("checks"))
    check_us = per_call_us(lambda n: ckpt.raise_if_failed())
    ckpt.close()
    with PreemptionGuard() as guard:
        guard_us = per_call_us(guard.should_stop)
    empty_us = per_call_us(lambda n: None)

    med = statistics.median
    step_ms = med(plain) / args.steps * 1e3
    block_ms = med(blocked) * 1e3
    slowdown = med(with_saves) / med(plain) - 1
    saves = args.steps // args.save_every
    per_save_ms = (med(with_saves) - med(plain)) / saves * 1e3

    print(
        f"\n{mbytes:.1f} MB TrainState ({args.plan} on {n} {jax.default_backend()} "
        f"device(s), MLP width {width}, AdamW), median of {args.repeat}\n"
    )
    rows = [
        ("save + wait (MB/s)", mbytes / med(tx_save), mbytes / med(ox_save)),
        (
            "restore, fingerprints checked (MB/s)",
            mbytes / med(tx_restore),
            mbytes / med(ox_restore),
        ),
        ("restore, `verify=False` (MB/s)", mbytes / med(tx_unverified), None),
        ("fingerprints of the state (MB/s)", mbytes / med(fp_times), None),
        ("first save in process (s)", tx_first[0], ox_first[0]),
    ]
    print("| measure | Titanax `OrbaxCheckpoint` | raw Orbax |")
    print("|---|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {'-' if b is None else f'{b:.1f}'} |")
    print()
    print("| training loop | value |")
    print("|---|---:|")
    print(f"| step time (ms) | {step_ms:.1f} |")
    print(f"| `save()` blocks the loop, state ready (ms) | {block_ms:.1f} |")
    print(f"| blocked / step time | {block_ms / step_ms:.3f} |")
    print(
        f"| loop time added per save, all included (ms; in steps) | "
        f"{per_save_ms:.0f}; {per_save_ms / step_ms:.2f} |"
    )
    print(
        f"| loop slowdown, a save every {args.save_every} steps "
        f"(background write included) | {slowdown:+.1%} |"
    )
    print()
    print("| per-step check (one process) | µs per call |")
    print("|---|---:|")
    print(f"| `ckpt.raise_if_failed()` | {check_us - empty_us:.3f} |")
    print(f"| `guard.should_stop(step)` | {guard_us - empty_us:.3f} |")
    print(f"| (loop and lambda overhead, subtracted) | {empty_us:.3f} |")
    print(
        f"\ncommand: python benchmarks/checkpoint.py {' '.join(sys.argv[1:])}".rstrip()
    )
    from titanax.checkpoint._metadata import versions

    found = versions()
    print(f"jax {found['jax']}, orbax-checkpoint {found['orbax-checkpoint']}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
