"""The reference GPT: training quality and speed, Trainer overhead, TP communication.

Three parts, chosen with `--parts` (default `a,b,c`):

- **a**: the `baby` preset (4 layers, 4 heads, 128 wide, context 64) trained on
  tinyshakespeare bytes with `tx.Trainer` on one device: batch 12, AdamW lr 1e-3,
  b2 0.99, warmup 100, cosine to 1e-4, weight decay 0.1, clip 1.0, `--steps` steps
  (default 2000). The batches are random windows, as nanoGPT's `get_batch` draws
  them: every window of the first 90% of the bytes (`tx.data.TextWindows` with
  `stride=1`), shuffled by a `tx.data.Pipeline`; the last 10% validates. Prints the
  final train/val loss (mean over `--eval-batches` fixed random batches per split)
  and ms/step (after the compiling first step).
- **b**: the step time of `tx.Trainer.fit` against a hand-written `jax.jit` loop
  (jit over params and optimizer state, donated, the batch placed each step; the
  same model, loss and optimizer), in alternating rounds in this process; medians.
- **c**: the collectives of one compiled training step under TP=1, 2, 4, 8 (and
  DP=2 x TP=4), read from the HLO, per device per step. Runs in a subprocess with 8
  simulated CPU devices. Uses `baby` with 8 heads (same parameter count) so that
  TP=8 keeps whole heads per device.

- **n**: side by side with nanoGPT (PyTorch, not vendored: pass a checkout with
  `--nanogpt DIR` and an interpreter that has torch, numpy and requests with
  `--torch-python`) on its `shakespeare_char` data (65 characters; prepared by its
  own `data/shakespeare_char/prepare.py` from `--text`): the README's CPU
  configuration (4 layers, 4 heads, 128 wide, context 64, batch 12, fp32, AdamW lr
  1e-3, b2 0.99, warmup 100, cosine to 1e-4 over 2000 iterations, clip 1.0, no
  dropout; tied embeddings, no biases, as nanoGPT has them). Each contender runs
  in its own process, `--rounds` interleaved rounds of `--iters` iterations: nanoGPT's
  `train.py`, a hand-written `jax.jit` loop with the same model, loss and optimizer,
  and `tx.Trainer.fit`, with and without `tx.configure_allocator()` (`--contenders`).
  nanoGPT times every iteration (PyTorch on a CPU is synchronous; it prints
  `loss.item()` each iteration); the JAX loops wait for the step every `--sync-every`
  iterations (the Trainer logs then, as it does by default every 10 steps) and
  count the chunk's mean per iteration. The table gives the median ms/iter of
  iterations 10..iters-1 per round, and the load average. `--quality-steps N` also
  trains nanoGPT and the Trainer for N iterations once and prints their validation
  loss (mean over 200 random batches of 12). With `--slices K` the contenders run
  time-sliced instead: all started at once, each in turn for `--slice-seconds`
  while the others are SIGSTOPped, K turns each; only the iterations timed wholly
  within a contender's turns count (on a machine whose speed drifts within
  minutes, sequential rounds land contenders in different phases).

Run from the repository root:

    .venv/bin/python benchmarks/gpt.py --parts c,b
    .venv/bin/python benchmarks/gpt.py --parts a --steps 2000
    .venv/bin/python benchmarks/gpt.py --parts n --nanogpt /tmp/nanoGPT \
        --torch-python /tmp/hf/bin/python --rounds 3 --iters 200 --quality-steps 2000
    .venv/bin/python benchmarks/gpt.py --parts n --nanogpt /tmp/nanoGPT \
        --torch-python /tmp/hf/bin/python --contenders nanogpt,jax,titanax \
        --slices 30 --slice-seconds 3

Every process calls `tx.configure_allocator()` first (glibc keeps XLA:CPU's step
buffers mapped), except the `titanax-default-malloc` contender of part n.

Markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import titanax as tx  # noqa: E402

if "--default-malloc" not in sys.argv:
    tx.configure_allocator()  # before JAX starts its backend

from models import gpt_plans  # noqa: E402
from models.gpt import GPT, GPTConfig, gpt_loss, param_count  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BATCH = 12


# ----------------------------------------------------------------------------
# Data: random contiguous windows, nanoGPT's get_batch: every window (stride 1) of
# the tokens, shuffled by a titanax.data pipeline


def byte_windows(
    path: Path, block: int
) -> tuple[tx.data.TextWindows, tx.data.TextWindows]:
    """Windows of `block` bytes at every start of the first 90% (training) and the
    last 10% (validation) of a text file."""
    train = tx.data.TextWindows(path, block, stride=1, span=(0.0, 0.9))
    val = tx.data.TextWindows(path, block, stride=1, span=(0.9, 1.0))
    return train, val


def fixed_batches(windows: tx.data.TokenWindows, n: int, seed: int) -> list[dict]:
    """The first `n` global batches of random windows shuffled by `seed`."""
    stream = tx.data.Pipeline(windows, BATCH, seed=seed)
    return [stream.global_batch(i * BATCH) for i in range(n)]


def optimizer(steps: int) -> optax.GradientTransformation:
    return tx.optim.adamw(
        1e-3,
        b2=0.99,
        weight_decay=0.1,
        clip_norm=1.0,
        warmup_steps=100,
        total_steps=max(steps, 101),
        end_lr=1e-4,
    )


def single_device_mesh():
    return tx.make_mesh(jax.devices()[:1], data=1)


# ----------------------------------------------------------------------------
# (a) train baby on tinyshakespeare


def part_a(args: argparse.Namespace) -> None:
    config = GPTConfig.preset("baby")
    block = config.block_size
    train, val = byte_windows(Path(args.text), block)
    trainer = tx.Trainer(
        lambda key: GPT(config, key=key),
        gpt_plans.dp(),
        optimizer=optimizer(args.steps),
        loss=gpt_loss,
        mesh=single_device_mesh(),
        loggers=[tx.loggers.Basic()],
        log_every=args.log_every,
        tokens_per_sample=block,
    )
    data = tx.data.Pipeline(train, BATCH, seed=0)
    start = time.perf_counter()
    trainer.fit(data, steps=1)  # compiles
    compiled = time.perf_counter()
    # The same stream from its second batch (a second `fit` on the pipeline would
    # start it at sample 0 again); `steps` is a total.
    with data.batches(BATCH) as rest:
        state = trainer.fit(rest, steps=args.steps)
    jax.block_until_ready(state.model)
    end = time.perf_counter()
    ms = (end - compiled) / (args.steps - 1) * 1e3
    losses = {
        name: trainer.evaluate(fixed_batches(windows, args.eval_batches, seed=1))[
            "loss"
        ]
        for name, windows in (("train", train), ("val", val))
    }
    print(f"\n### (a) baby GPT on tinyshakespeare, {args.steps} steps, one device\n")
    print(
        f"{param_count(config) / 1e6:.2f}M parameters, batch {BATCH}, context {block}"
    )
    print("\n| steps | train loss | val loss | ms/step | first step (compile) s |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.steps} | {losses['train']:.4f} | {losses['val']:.4f} | {ms:.1f} "
        f"| {compiled - start:.1f} |"
    )
    print(f"\nloss: mean over {args.eval_batches} fixed random batches per split")


# ----------------------------------------------------------------------------
# (b) Trainer against a hand-written jax.jit loop


def hand_written(model, opt, batches):
    """What a careful JAX user writes: one jit over (params, opt_state, batch),
    state donated, the host batch placed each step."""
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(jax.numpy.copy, params)
    opt_state = opt.init(params)

    def step(params, opt_state, batch):
        def objective(p):
            return gpt_loss(eqx.combine(p, static), batch, None)[0]

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state, value = step(params, opt_state, jax.device_put(batches[0]))
    jax.block_until_ready(value)  # compiled

    def run(n):
        nonlocal params, opt_state
        start = time.perf_counter()
        for i in range(n):
            batch = jax.device_put(batches[i % len(batches)])
            params, opt_state, value = step(params, opt_state, batch)
        jax.block_until_ready(value)
        return (time.perf_counter() - start) / n

    return run


def with_trainer(model, opt, batches):
    trainer = tx.Trainer(
        model,
        gpt_plans.dp(),
        optimizer=opt,
        loss=gpt_loss,
        mesh=single_device_mesh(),
        log_every=10**9,
    )
    trainer.fit(batches, steps=2)  # compiled

    def run(n):
        data = [batches[i % len(batches)] for i in range(n)]
        start = time.perf_counter()
        state = trainer.fit(data, steps=n)
        jax.block_until_ready(state.model)
        return (time.perf_counter() - start) / n

    return run


def part_b(args: argparse.Namespace) -> None:
    config = GPTConfig.preset("baby")
    train, _ = byte_windows(Path(args.text), config.block_size)
    model = GPT(config, key=jax.random.key(0))
    batches = fixed_batches(train, 16, seed=2)
    opt = optimizer(10_000)
    runs = {
        "hand-written jax.jit": hand_written(model, opt, batches),
        "tx.Trainer.fit": with_trainer(model, opt, batches),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for label, run in runs.items():
            times[label].append(run(args.round_steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n### (b) baby GPT step time, one device: {args.rounds} alternating rounds "
        f"of {args.round_steps} steps\n"
    )
    print("| loop | median ms/step | min | max |")
    print("|---|---|---|---|")
    for label, values in times.items():
        print(
            f"| {label} | {med[label] * 1e3:.1f} | {min(values) * 1e3:.1f} | "
            f"{max(values) * 1e3:.1f} |"
        )
    ratio = med["tx.Trainer.fit"] / med["hand-written jax.jit"]
    print(f"\nratio Trainer / hand-written: **{ratio:.3f}**")


# ----------------------------------------------------------------------------
# (c) collectives per step under TP, from compiled HLO (8 simulated devices)

LAYOUTS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4)]  # (data, model)


def part_c_worker() -> None:
    from titanax._explain import bytes_per_device
    from titanax._hlo import collectives

    # Scanned layers, so that each layer's collectives are one loop body's.
    config = GPTConfig.preset("baby", n_head=8, unroll=False)
    abstract = eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))
    # Random weights drawn in numpy: only shapes and shardings matter here.
    shapes, static = eqx.partition(
        abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )
    rng = np.random.default_rng(0)
    arrays = jax.tree.map(
        lambda s: 0.02 * rng.standard_normal(s.shape).astype(np.float32), shapes
    )
    model = eqx.combine(arrays, static)
    batch = {"x": np.zeros((BATCH, 64), np.int32), "y": np.zeros((BATCH, 64), np.int32)}
    act = BATCH * config.block_size * config.n_embd * 4
    print(
        f"\n### (c) collectives of one training step, `baby` with 8 heads "
        f"({config.n_layer} layers), batch {BATCH}, context {config.block_size}\n"
    )
    print(
        "Per device per step. Ops inside the layer scan count once per layer "
        f"({config.n_layer}x). Bytes are each op's result size per device (a ring "
        "all-reduce moves about 2(n-1)/n of that per device). One [B, T, C] "
        f"activation = {act:,} bytes (a DP shard holds 1/DP of it).\n"
    )
    print(
        "| layout | params/device | kind | mesh axes | ops/step | of which in layer "
        "scan | bytes/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for data, model_size in LAYOUTS:
        mesh = tx.make_mesh(
            jax.devices()[: data * model_size], data=data, model=model_size
        )
        plan = gpt_plans.plan_for(dp_size=data, tp_size=model_size)
        step = tx.make_train_step(gpt_loss, optax.sgd(0.1), plan, mesh)
        state = step.init(model, 0)
        ops = collectives(step.lower(state, batch).compile().as_text(), mesh)
        name = f"DP={data} x TP={model_size}" if data > 1 else f"TP={model_size}"
        params = f"{bytes_per_device(state.model) / 1024:.0f} KiB"
        rows: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for c in ops:
            trips = config.n_layer if c.in_loop else 1
            row = rows.setdefault((c.kind, c.axes), [0, 0, 0])
            row[0] += trips
            row[1] += trips if c.in_loop else 0
            row[2] += trips * c.bytes
        if not rows:
            print(f"| {name} | {params} | none | | 0 | 0 | 0 |")
        total = 0
        for (kind, axes), (count, looped, nbytes) in sorted(rows.items()):
            total += nbytes
            over = ", ".join(axes) or "-"
            print(
                f"| {name} | {params} | {kind} | {over} | {count} | {looped} "
                f"| {nbytes:,} |"
            )
        if rows:
            print(f"| {name} | | **total** | | | | **{total:,}** |")
        sys.stdout.flush()


def part_c() -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__, "--parts", "c-worker"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    print(proc.stdout, end="")
    if proc.returncode:
        raise SystemExit(f"part (c) failed:\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------
# (n) side by side with nanoGPT (separate processes, interleaved rounds)

NANOGPT_ARGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
    "--always_save_checkpoint=False",
]
CONTENDERS = ["nanogpt", "jax", "titanax", "titanax-default-malloc"]


def _char_data(
    nanogpt: Path, block: int
) -> tuple[tx.data.TokenWindows, tx.data.TokenWindows, int]:
    """Windows of `block` tokens at every start (stride 1) of nanoGPT's
    shakespeare_char token files (train, val), and the vocabulary size."""
    folder = nanogpt / "data" / "shakespeare_char"
    text = (folder / "input.txt").read_text()
    train = tx.data.TokenWindows(folder / "train.bin", block, stride=1)  # uint16
    val = tx.data.TokenWindows(folder / "val.bin", block, stride=1)
    return train, val, len(set(text))


def _nanogpt_config(vocab: int) -> GPTConfig:
    # nanoGPT's model: tied embeddings, no biases (its train.py default).
    return GPTConfig(
        vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128,
        bias=False, tie_weights=True,
    )  # fmt: skip


def _optimizer_2000() -> optax.GradientTransformation:
    return tx.optim.adamw(
        1e-3, b2=0.99, weight_decay=0.1, clip_norm=1.0, warmup_steps=100,
        total_steps=2000, end_lr=1e-4,
    )  # fmt: skip


def part_n_worker(args: argparse.Namespace) -> None:
    """One contender's run in this process: prints a JSON line of per-iteration
    times (seconds) and, with `--quality-steps`, the validation loss."""
    train, val, vocab = _char_data(Path(args.nanogpt), block=64)
    config = _nanogpt_config(vocab)
    model = GPT(config, key=jax.random.key(1337))
    # Random windows, as nanoGPT's get_batch; read in the loop as it reads them
    # (no read-ahead threads on the shared cores).
    data = tx.data.Pipeline(train, BATCH, seed=0, num_threads=0, prefetch=0)
    iters = args.quality_steps or args.iters
    times: list[float] = []
    if args.contender == "jax":
        batches = [data.global_batch(i * BATCH) for i in range(16)]
        run = hand_written(model, _optimizer_2000(), batches)
        for _ in range(iters // args.sync_every):
            # `sync_every` steps dispatched back to back, then waited for.
            times += [run(args.sync_every)] * args.sync_every
            if args.stream:
                print(_CHUNK.format(times[-1] * 1e3), flush=True)
        print(json.dumps({"times": times}))
        return
    stamps: list[float] = []

    def stamp(step, metrics, trainer):
        stamps.append(time.perf_counter())
        if args.stream and len(stamps) > 1:
            chunk = (stamps[-1] - stamps[-2]) / args.sync_every
            print(_CHUNK.format(chunk * 1e3), flush=True)

    trainer = tx.Trainer(
        model,
        gpt_plans.dp(),
        optimizer=_optimizer_2000(),
        loss=gpt_loss,
        mesh=single_device_mesh(),
        log_every=args.sync_every,  # metrics fetched (a sync) at each log step
        hooks=[stamp],
    )
    start = time.perf_counter()
    trainer.fit(data, steps=iters)
    for chunk in np.diff([start, *stamps]):
        times += [chunk / args.sync_every] * args.sync_every
    out: dict[str, object] = {"times": times}
    if args.quality_steps:
        out["val"] = trainer.evaluate(fixed_batches(val, 200, seed=1))["loss"]
    print(json.dumps(out))


def _prepare_nanogpt(nanogpt: Path, text: Path, python: str) -> None:
    folder = nanogpt / "data" / "shakespeare_char"
    if (folder / "train.bin").exists():
        return
    shutil.copy(text, folder / "input.txt")  # prepare.py downloads it otherwise
    subprocess.run([python, "prepare.py"], cwd=folder, check=True, capture_output=True)


# A streaming worker's line per chunk of `sync_every` steps, in ms per iteration
# (nanoGPT prints its own line per iteration).
_CHUNK = "chunk: time {:.3f}ms"
_TIME_LINE = re.compile(r"(?:^iter \d+: loss [\d.]+, |^chunk: )time ([\d.]+)ms", re.M)


def _contender_command(name: str, args: argparse.Namespace, iters: int) -> list[str]:
    if name == "nanogpt":
        out_dir = Path(args.nanogpt) / "out-titanax-pairing"
        cmd = [args.torch_python, "train.py", *NANOGPT_ARGS, f"--out_dir={out_dir}"]
        return cmd + [f"--max_iters={iters}"]
    cmd = [sys.executable, __file__, "--parts", "n-worker", "--nanogpt", args.nanogpt]
    cmd += ["--contender", "jax" if name == "jax" else "titanax"]
    cmd += ["--iters", str(iters)]
    return cmd + (["--default-malloc"] if name == "titanax-default-malloc" else [])


def _iters_per_report(name: str, args: argparse.Namespace) -> int:
    return 1 if name == "nanogpt" else args.sync_every


def _time_sliced(args: argparse.Namespace, names: list[str]) -> None:
    """All contenders started at once and run in turn, `--slice-seconds` each
    (the others SIGSTOPped), for `--slices` turns each: every contender sees the
    same phases of a noisy machine. Each worker reports a time per iteration (or
    per chunk of `sync_every`); a reader thread stamps each report on arrival,
    and only those that began and ended within one of its turns count."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONUNBUFFERED"] = "1"
    procs = {
        n: subprocess.Popen(
            _contender_command(n, args, 10**6)
            + (["--eval_interval=100000", "--eval_iters=1"] if n == "nanogpt"
               else ["--stream"]),
            cwd=args.nanogpt if n == "nanogpt" else None,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        for n in names
    }  # fmt: skip
    reports: dict[str, list[tuple[float, float]]] = {n: [] for n in names}

    def read(name: str) -> None:
        for line in procs[name].stdout:  # type: ignore[union-attr]
            if m := _TIME_LINE.match(line):
                reports[name].append((time.time(), float(m.group(1))))

    for name in names:
        threading.Thread(target=read, args=(name,), daemon=True).start()
    turns: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for p in procs.values():
        p.send_signal(signal.SIGSTOP)
    load = [os.getloadavg()[0]]
    try:
        for _ in range(args.slices):
            for name, p in procs.items():
                start = time.time()
                p.send_signal(signal.SIGCONT)
                time.sleep(args.slice_seconds)
                p.send_signal(signal.SIGSTOP)
                turns[name].append((start, time.time()))
            load.append(os.getloadavg()[0])
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    print(
        f"\n### (n) side by side with nanoGPT, time-sliced: {args.slices} turns of "
        f"{args.slice_seconds:g} s per contender, round robin; load average "
        f"{min(load):.2f}-{max(load):.2f}\n"
    )
    print("| contender | median ms/iter | iterations counted | relative to nanoGPT |")
    print("|---|---:|---:|---:|")
    medians = {}
    for name in names:
        per_report = _iters_per_report(name, args)
        counted = []
        for end, ms in reports[name][-(-10 // per_report) :]:  # from iteration 10
            begin = end - ms * per_report / 1e3
            if any(a <= begin and end <= b for a, b in turns[name]):
                counted.append(ms)
        medians[name] = statistics.median(counted) if counted else float("nan")
        rel = medians[name] / medians.get("nanogpt", float("nan"))
        print(
            f"| {name} | {medians[name]:.1f} | {len(counted) * per_report} "
            f"| {rel:.3f} |"
        )


def _run_contender(name: str, args: argparse.Namespace, iters: int, quality: int):
    cmd = _contender_command(name, args, quality or iters)
    if name == "nanogpt":
        cmd += [
            "--eval_interval=2000",
            "--eval_iters=200" if quality else "--eval_iters=1",
        ]
        proc = subprocess.run(
            cmd, cwd=args.nanogpt, capture_output=True, text=True, check=False
        )
        if proc.returncode:
            raise SystemExit(f"nanoGPT failed:\n{proc.stderr[-3000:]}")
        times = [float(m.group(1)) / 1e3 for m in _TIME_LINE.finditer(proc.stdout)]
        vals = re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                          proc.stdout, re.M)  # fmt: skip
        return {"times": times, "val": float(vals[-1][1]) if quality else None}
    cmd += ["--quality-steps", str(quality)]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_n(args: argparse.Namespace) -> None:
    if not args.nanogpt or not args.torch_python:
        raise SystemExit("part n needs --nanogpt DIR and --torch-python PYTHON")
    _prepare_nanogpt(Path(args.nanogpt), Path(args.text), args.torch_python)
    names = args.contenders.split(",")
    if args.slices:
        _time_sliced(args, names)
        return
    print(
        f"\n### (n) side by side with nanoGPT: {args.rounds} interleaved rounds of "
        f"{args.iters} iterations; median ms/iter of iterations 10-{args.iters - 1}\n"
    )
    print("| round | load avg (1 min) | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        for name in names:
            times = _run_contender(name, args, args.iters, 0)["times"]
            medians[name].append(statistics.median(times[10:]) * 1e3)
        row = " | ".join(f"{medians[n][-1]:.1f}" for n in names)
        print(f"| {r + 1} | {load:.2f} | {row} |")
        sys.stdout.flush()
    overall = {n: statistics.median(v) for n, v in medians.items() if v}
    if overall:
        row = " | ".join(f"**{overall[n]:.1f}**" for n in names)
        print(f"| median | | {row} |")
    if "nanogpt" in overall:
        ratios = ", ".join(
            f"{n} {overall[n] / overall['nanogpt']:.2f}x" for n in names
            if n != "nanogpt"
        )  # fmt: skip
        print(f"\nms/iter relative to nanoGPT: {ratios}")
    if args.quality_steps:
        print(f"\nvalidation loss after {args.quality_steps} iterations:\n")
        print("| contender | val loss | median ms/iter (10..) |")
        print("|---|---|---|")
        for name in [n for n in ("nanogpt", "titanax") if n in names]:
            out = _run_contender(name, args, args.iters, args.quality_steps)
            ms = statistics.median(out["times"][10:]) * 1e3
            print(f"| {name} | {out['val']:.4f} | {ms:.1f} |")
            sys.stdout.flush()


# ----------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--parts", default="a,b,c", help="any of a, b, c, n, comma-separated"
    )
    p.add_argument("--text", default=str(SHAKESPEARE), help="training text")
    p.add_argument("--steps", type=int, default=2000, help="(a) training steps")
    p.add_argument("--eval-batches", type=int, default=50, help="(a) per split")
    p.add_argument("--log-every", type=int, default=100, help="(a)")
    p.add_argument("--rounds", type=int, default=5, help="(b) alternating rounds")
    p.add_argument("--round-steps", type=int, default=30, help="(b) steps per round")
    p.add_argument("--nanogpt", default=None, help="(n) a nanoGPT checkout")
    p.add_argument("--torch-python", default=None, help="(n) python with torch")
    p.add_argument("--iters", type=int, default=200, help="(n) iterations per run")
    p.add_argument("--quality-steps", type=int, default=0, help="(n) 0: no quality")
    p.add_argument("--sync-every", type=int, default=10, help="(n) JAX loops")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="(n)")
    p.add_argument(
        "--slices", type=int, default=0, help="(n) time-sliced turns (0: rounds)"
    )
    p.add_argument("--slice-seconds", type=float, default=3.0, help="(n) per turn")
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", default="titanax", help=argparse.SUPPRESS)
    p.add_argument("--default-malloc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    parts = args.parts.split(",")
    if "c-worker" in parts:
        part_c_worker()
        return
    if "n-worker" in parts:
        part_n_worker(args)
        return
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU cores, titanax {tx.__version__}"
    )
    start = time.perf_counter()
    for part, run in (
        ("c", part_c),
        ("b", lambda: part_b(args)),
        ("n", lambda: part_n(args)),
    ):
        if part in parts:
            run()
    if "a" in parts:
        part_a(args)
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
