"""Pipelines: ticks, bubble, temporary memory and boundary traffic per step.

For GPipe and 1F1B, S in {2, 4} stages and M in {S, 2S, 4S} microbatches of a fixed
size, compiles one pipelined loss-and-gradient step of a 4-layer GPT on S simulated
CPU devices and reads from it:

- the schedule's ticks and its theoretical bubble (S - 1) / (M + S - 1);
- `memory_analysis().temp_size_in_bytes` (per device);
- the collective-permutes over `pipe` in the compiled HLO (ops and bytes per op):
  one per kind of tick, in a `switch` inside the tick loop, so each tick runs one;
- the transfers per step those ticks make (from `send_patterns` for 1F1B, GPipe's
  forward ticks and their transposes), against the ideal 2 M (S - 1): every
  microbatch crosses each stage boundary once forward (activations) and once
  backward (cotangents); and the bytes the busiest device sends per step.

Run from the repository root:

    .venv/bin/python benchmarks/pipeline.py

A Markdown table goes to stdout. Only compiles: timing the bubble needs a GPU.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import titanax as tx  # noqa: E402

tx.simulate_cpu_devices(8)

import jax  # noqa: E402

from models import gpt_plans  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402
from titanax._hlo import collectives  # noqa: E402
from titanax.parallel.pipeline import (  # noqa: E402
    pipeline_schedule,
    pipeline_value_and_grad,
    send_patterns,
)
from titanax.parallel.pipeline._executor import _gpipe_patterns  # noqa: E402

ROWS_PER_MICRO, CONTEXT = 2, 32


def transfers(schedule: str, stages: int, microbatches: int) -> list[tuple[int, int]]:
    """Every (source, target) stage transfer of one step, as the executor runs them."""
    if schedule == "1f1b":
        per_tick, patterns = send_patterns(
            pipeline_schedule("1f1b", stages, microbatches)
        )
    else:  # forward ticks; autodiff runs each transfer's transpose backward
        per_tick, patterns = _gpipe_patterns(stages, microbatches)
    sent = [pair for t in per_tick for pair in patterns[t]]
    return sent if schedule == "1f1b" else sent + [(b, a) for a, b in sent]


def measure(schedule: str, stages: int, microbatches: int) -> dict[str, Any]:
    config = GPTConfig.preset("tiny", n_layer=4, block_size=CONTEXT, vocab_size=256)
    model = GPT(config, key=jax.random.key(0))
    plan = gpt_plans.pp(stages, microbatches, schedule)
    mesh = tx.make_mesh(jax.devices()[:stages], pipe=stages)
    rows = ROWS_PER_MICRO * microbatches
    tokens = jax.numpy.zeros((rows, CONTEXT), jax.numpy.int32)
    batch = {"x": tokens, "y": tokens}

    def step(m, b):
        return pipeline_value_and_grad(
            gpt_plans.STAGE, m, b, None, plan=plan, mesh=mesh
        )

    compiled = jax.jit(step).lower(tx.shard(model, plan, mesh), batch).compile()
    permutes = [
        c
        for c in collectives(compiled.as_text(), mesh)
        if c.kind == "collective-permute"
    ]
    assert all(c.in_loop and c.axes == ("pipe",) for c in permutes), permutes
    op_bytes = {c.bytes for c in permutes}
    sent = transfers(schedule, stages, microbatches)
    busiest = max(collections.Counter(src for src, _ in sent).values())
    info = pipeline_schedule(schedule, stages, microbatches)
    return {
        "ticks": info.num_ticks,
        "bubble": info.bubble_fraction,
        "temp": compiled.memory_analysis().temp_size_in_bytes,
        "ops": len(permutes),
        "op_bytes": op_bytes,
        "transfers": len(sent),
        "ideal": 2 * microbatches * (stages - 1),
        "busiest": busiest * max(op_bytes),
        "boundary": ROWS_PER_MICRO * CONTEXT * config.n_embd * 4,  # fp32
    }


def main() -> None:
    print(
        "| schedule | S | M | ticks | bubble | temp bytes/device | permute ops "
        "(bytes each) | transfers/step | ideal 2M(S-1) | busiest device sends/step |"
    )
    print("| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for schedule in ("gpipe", "1f1b"):
        for stages in (2, 4):
            for micro in (stages, 2 * stages, 4 * stages):
                r = measure(schedule, stages, micro)
                assert r["op_bytes"] == {r["boundary"]}, r
                print(
                    f"| {schedule} | {stages} | {micro} | {r['ticks']} | "
                    f"{r['bubble']:.3f} | {r['temp']:,} | {r['ops']} "
                    f"({r['boundary']:,} B) | {r['transfers']} | {r['ideal']} | "
                    f"{r['busiest']:,} B |"
                )


if __name__ == "__main__":
    main()
