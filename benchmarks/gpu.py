"""GPT-2 124M training throughput on one accelerator: tokens/s, step time, MFU, memory.

Trains `GPTConfig.preset("small")` (GPT-2 124M: 12 layers, 12 heads, 768 wide,
context 1024, vocabulary 50304, tied, biases) with `tx.make_train_step` on one
device: bf16 compute with float32 master weights (`tx.Precision.bf16()`), AdamW
(lr 6e-4, b2 0.95, weight decay 0.1, clip 1.0), a fixed batch of random tokens kept
on the device (this measures the step, not a data pipeline). After `--warmup`
steps (the first compiles), `--steps` steps are timed, each waited for, and it prints:

- tokens/s and the median and mean step time (ms);
- MFU two ways, against `--peak-flops` (default: the device's dense peak for the
  compute type, `tx.loggers.peak_flops_per_device`): FLOPs per step from XLA's
  cost analysis of the step (an unrolled lowering, so that every layer is
  counted), and from `6 N + 12 L H Q T` per token (PaLM's estimate, nanoGPT's
  and llm.c's: N non-embedding parameters);
- peak device memory (`device.memory_stats()["peak_bytes_in_use"]`) and XLA's
  memory analysis of the compiled step (arguments, outputs, temporaries);
- compile time.

Flags choose the rematerialisation policy (`--remat`: none, full, dots,
dots_no_batch), the attention implementation (`--attention`: xla, cudnn,
`default` for `jax.nn.dot_product_attention`'s choice, or explicit einsums), the
batch size and context, the precision, and whether the layers are unrolled
(`--unroll`; default: a scan, whose compile time is flat in depth).

    # one H200 (a few minutes including compilation):
    python benchmarks/gpu.py --batch 16 --attention cudnn --remat none --steps 50
    # CPU smoke test (a tiny config, seconds; run by the test suite):
    python benchmarks/gpu.py --smoke

The anchors: llm.c reports ~60% MFU for GPT-2 124M on A100s; TorchTitan 33-39% for
Llama 3 8B on H100s without fp8.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import titanax as tx  # noqa: E402
from models.gpt import GPT, GPTConfig, flops_per_token, gpt_loss  # noqa: E402
from titanax._flops import xla_flops  # noqa: E402


def peak_flops(device: jax.Device, precision: str, override: float | None):
    """`override`, or the device's dense peak for the compute type (None if unknown):
    float32 matmuls run as TF32 on NVIDIA tensor cores at JAX's default precision."""
    if override is not None:
        return override
    kind = "bf16" if precision == "bf16" else "tf32"
    return tx.loggers.peak_flops_per_device(device, kind)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="context length")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compile)")
    p.add_argument(
        "--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"]
    )
    p.add_argument(
        "--attention",
        default="default",
        choices=["default", "xla", "cudnn", "explicit"],
    )
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--unroll", action="store_true", help="unroll the 12 layers")
    p.add_argument("--peak-flops", type=float, default=None, help="FLOP/s of 100%%")
    p.add_argument("--smoke", action="store_true", help="tiny config, for CPU tests")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.seq < 1:
        p.error(f"--seq must be positive, got {args.seq}")
    return args


def model_config(args: argparse.Namespace) -> GPTConfig:
    attention = None if args.attention == "default" else args.attention
    base = "tiny" if args.smoke else "small"
    overrides = dict(
        remat=args.remat, attention=attention, unroll=True if args.unroll else 1
    )
    if args.smoke:
        overrides.update(vocab_size=64, block_size=args.seq, bias=True)
        overrides.update(tie_weights=True)
    config = GPTConfig.preset(base, **overrides)
    if args.seq > config.block_size:
        raise SystemExit(f"--seq {args.seq} exceeds the context {config.block_size}")
    return config


def lowered_flops(step: tx.TrainStep, state: tx.TrainState, batch: dict):
    """FLOPs of one step from XLA's cost analysis of its lowering (None where the
    backend gives none): before compilation, so matmuls that a GPU backend hands to
    cuBLAS still count. Loops count once there, so `run` lowers with the layers
    unrolled when measuring this."""
    return xla_flops(step.lower(state, batch))


def run(args: argparse.Namespace) -> dict[str, float | str | None]:
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 3, 1
    device = jax.devices()[0]
    mesh = tx.make_mesh([device], data=1)
    config = model_config(args)
    precision = tx.Precision.bf16() if args.precision == "bf16" else None
    optimizer = tx.optim.adamw(6e-4, b2=0.95, weight_decay=0.1, clip_norm=1.0)

    def make_step(cfg: GPTConfig) -> tuple[tx.TrainStep, tx.TrainState]:
        step = tx.make_train_step(
            gpt_loss, optimizer, tx.Plan(), mesh, precision=precision
        )
        return step, step.init(lambda k: GPT(cfg, key=k), 0)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, min(config.vocab_size, 50257), (args.batch, args.seq + 1))
    tokens = tokens.astype(np.int32)
    host_batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}

    # XLA's FLOPs of the same step with the layers unrolled (lowered, not compiled).
    counter, counter_state = make_step(dataclasses.replace(config, unroll=True))
    flops_xla = lowered_flops(counter, counter_state, host_batch)
    del counter, counter_state

    step, state = make_step(config)
    program = step.compile(state, host_batch)  # the step's program (state donated)
    arrays = program.flatten(state)
    batch = program.place(host_batch)  # on the device once: the step alone is timed
    start = time.perf_counter()
    compiled = program.lower(arrays, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    metrics = None  # the step's metrics vector (`program.metrics` names it)
    for _ in range(args.warmup):
        arrays, metrics = compiled(arrays, batch)
    jax.block_until_ready(arrays)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        arrays, metrics = compiled(arrays, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    loss = program.host_metrics(metrics)["loss"]

    tokens_per_step = args.batch * args.seq
    flops_model = flops_per_token(config, args.seq) * tokens_per_step
    step_s = statistics.median(times)
    peak = peak_flops(device, args.precision, args.peak_flops)
    stats = device.memory_stats() or {}

    def mfu(flops: float | None) -> float | None:
        return None if peak is None or flops is None else flops / step_s / peak

    return {
        "device": device.device_kind,
        "platform": device.platform,
        "config": "tiny (smoke)" if args.smoke else "GPT-2 124M",
        "batch": args.batch,
        "seq": args.seq,
        "precision": args.precision,
        "remat": args.remat,
        "attention": args.attention,
        "unroll": bool(args.unroll),
        "compile_s": compile_s,
        "step_ms_median": step_s * 1e3,
        "step_ms_mean": statistics.mean(times) * 1e3,
        "tokens_per_s": tokens_per_step / step_s,
        "flops_per_step_xla": flops_xla,
        "flops_per_step_6n": float(flops_model),
        "peak_flops": peak,
        "mfu_xla": mfu(flops_xla),
        "mfu_6n": mfu(flops_model),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "xla_argument_bytes": memory.argument_size_in_bytes,
        "xla_output_bytes": memory.output_size_in_bytes,
        "xla_temp_bytes": memory.temp_size_in_bytes,
        "final_loss": loss,
    }


def report(r: dict) -> str:
    def pct(x):
        return "n/a (pass --peak-flops)" if x is None else f"{100 * x:.1f}%"

    def gib(x):
        return "n/a" if x is None else f"{x / 2**30:.2f} GiB"

    peak = r["peak_flops"]
    lines = [
        f"{r['config']} on {r['device']} ({r['platform']}), {r['precision']}, "
        f"batch {r['batch']} x {r['seq']}, remat {r['remat']}, attention "
        f"{r['attention']}, layers {'unrolled' if r['unroll'] else 'scanned'}",
        f"compile: {r['compile_s']:.1f} s",
        f"step: {r['step_ms_median']:.2f} ms median, {r['step_ms_mean']:.2f} ms mean",
        f"tokens/s: {r['tokens_per_s']:,.0f}",
        f"FLOPs/step: XLA {r['flops_per_step_xla'] or float('nan'):.4g}, "
        f"6N+attention {r['flops_per_step_6n']:.4g}",
        "peak FLOP/s: " + ("unknown" if peak is None else f"{peak:.4g}"),
        f"MFU: {pct(r['mfu_xla'])} (XLA FLOPs), {pct(r['mfu_6n'])} (6N+attention)",
        f"peak memory: {gib(r['peak_bytes_in_use'])} in use (device stats); XLA: "
        f"arguments {gib(r['xla_argument_bytes'])}, temporaries "
        f"{gib(r['xla_temp_bytes'])}",
        f"final loss: {r['final_loss']:.4f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = run(args)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
