"""What `titanax explain` and `titanax info` do (`titanax train` is
`titanax.config.train`)."""

from __future__ import annotations

import platform
import re
import textwrap
import time
from typing import Any

import jax

from . import _distributed as distributed
from . import loggers as tlog
from ._compat import compiled_memory
from ._errors import ConfigError
from ._explain import bytes_per_device, explain
from ._flops import step_flops
from ._units import format_bytes
from ._versions import version_rows
from .config import Config, Run, build_run
from .config import train as train_config
from .train import TrainState, abstract_state

__all__ = [
    "explain_config",
    "info_text",
    "parse_bytes",
    "step_memory",
    "train_config",
]


# --- explain ----------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str) -> int:
    """`"80GB"` → 80e9, `"16GiB"` → 16 * 2**30, `"1024"` → 1024.

    **Raises:** `ConfigError` for anything else.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"Expected a memory size such as `80GB` or `16GiB`, got {text!r}.",
            path="--device-memory",
            suggestion="Write a number with B, KB, MB, GB, TB or KiB, MiB, GiB, TiB.",
        )
    return int(float(match.group(1)) * _UNITS[unit])


def step_memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step, from XLA's buffer assignment.

    **Returns:** `arguments`, `outputs`, `aliased` (outputs written over donated
    arguments), `temporaries`, `code`, and `peak` (arguments + outputs - aliased
    + temporaries + code: what the step needs at once).
    """
    m = compiled_memory(compiled)
    out = {
        "arguments": m.argument,
        "outputs": m.output,
        "aliased": m.alias,
        "temporaries": m.temp,
        "code": m.generated_code,
    }
    out["peak"] = (
        out["arguments"]
        + out["outputs"]
        - out["aliased"]
        + out["temporaries"]
        + out["code"]
    )
    return out


def _abstract_state(run: Run) -> TrainState:
    """The state the run's Trainer would place, as `ShapeDtypeStruct`s with their
    shardings: nothing is allocated."""
    trainer = run.trainer
    step = trainer.train_step
    return abstract_state(
        run.make_model,
        run.plan,
        run.mesh,
        trainer.optimizer,
        trainable=step.trainable,
        precision=step.precision,
        stage=step.stage,
        key=trainer.seed,
    )


def explain_config(
    config: Config, *, device_memory: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Compile the step of a config ahead of time and report it, without training.

    The step is compiled for the configured mesh against the abstract state
    (`tx.abstract_state`: shapes, dtypes and shardings) and the shapes of one batch
    of the data: nothing is placed on the devices and nothing runs, so a model
    larger than this host's memory can be explained.

    **Arguments:**

    - `config`: a loaded `Config`.
    - `device_memory`: bytes per device to check the step against.

    **Returns:** `(text, report)`: the printable report (plan table with the
    activations + scratch per device, memory, FLOPs, collectives, fits or not) and
    its numbers as a dict (`memory` from `step_memory`, `None` where the backend has
    no memory analysis; `flops_per_device`, `flops_per_step`, `devices`, `mesh`,
    `fits`, `None` without `device_memory` or a memory analysis; `compile_s`,
    `state_bytes_per_device`, `batch_bytes_per_device`, `output_arrays`, and
    `state`: `"abstract"`, nothing placed).

    !!! Example

        ```python
        text, report = explain_config(load_config("run.yaml"), device_memory=80e9)
        report["memory"]["peak"]  # bytes one device needs for the step
        ```
    """
    run = build_run(config, loggers=[])
    trainer = run.trainer
    state = _abstract_state(run)
    with run.data.batches(0, run.plan, run.mesh) as batches:
        batch = next(batches)  # its shapes only: it is never placed
    started = time.perf_counter()
    program = trainer.train_step.compile(state, batch)
    layout = program.batch
    batch_shapes = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for shape, dtype, sharding in zip(
            layout.shapes, layout.dtypes, layout.shardings, strict=True
        )
    ]
    arguments = (program.flatten(state), batch_shapes)
    compiled = program.lower(*arguments).compile()
    compile_s = time.perf_counter() - started
    table = explain(
        state.model,
        run.plan,
        run.mesh,
        compiled=compiled,
        extra_bytes_per_device={"optimizer state": bytes_per_device(state.opt_state)},
    )
    # None where the backend has no memory analysis: the text says so, never 0.
    memory = None if table.step_memory is None else step_memory(compiled)
    devices = run.mesh.size
    total = step_flops(compiled, program.run, arguments, devices)
    flops = None if total is None else total / devices
    report: dict[str, Any] = {
        "devices": devices,
        "mesh": dict(run.mesh.shape),
        "state": "abstract",
        "memory": memory,
        "flops_per_device": flops,
        "flops_per_step": None if flops is None else flops * devices,
        "compile_s": compile_s,
        "state_bytes_per_device": bytes_per_device(program.flatten(state)),
        "batch_bytes_per_device": bytes_per_device(batch_shapes),
        "fits": (
            None
            if device_memory is None or memory is None
            else memory["peak"] <= device_memory
        ),
        "output_arrays": len(jax.tree.leaves(compiled.output_shardings)),
    }
    compiled_for = "abstract state: nothing placed"
    lines = [
        str(table),
        "",
        f"Compiled step ({compile_s:.2f} s, {compiled_for}), per device:",
    ]
    if memory is None:
        lines.append(f"  memory unavailable ({table.step_memory_unavailable})")
    else:
        for name in ("arguments", "outputs", "aliased", "temporaries", "code", "peak"):
            lines.append(f"  {name + ':':<13}{format_bytes(memory[name]):>14}")
    if flops is not None:
        lines.append(
            f"FLOPs per step: {flops:.4g} per device, {flops * devices:.4g} over "
            f"{devices} devices"
        )
        if run.tokens_per_sample:
            tokens = config.data.batch_size * run.tokens_per_sample
            lines.append(f"FLOPs per token: {flops * devices / tokens:.4g}")
    if device_memory is not None and memory is None:
        lines.append(
            f"Device memory: unknown whether the step fits in "
            f"{format_bytes(device_memory)} per device (no memory analysis)."
        )
    elif device_memory is not None and memory is not None:
        verdict = "fits" if report["fits"] else "does NOT fit"
        share = 100 * memory["peak"] / device_memory
        lines.append(
            f"Device memory: the step {verdict} in {format_bytes(device_memory)} "
            f"per device (peak {format_bytes(memory['peak'])}, {share:.1f}%)."
        )
    return "\n".join(lines), report


# --- info -------------------------------------------------------------------------


def versions_text() -> str:
    """The installed versions against the tested range, one package a line."""
    rows = [("package", "installed", "tested", ""), *version_rows()]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], width, strict=True))
        + (f"  ({row[3]})" if row[3] else "")
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def info_text() -> str:
    """`titanax info`: versions, devices, processes and the detected cluster."""
    cluster = distributed.detect()
    lines = [
        f"python:    {platform.python_version()} ({platform.platform()})",
        "versions:  " + textwrap.indent(versions_text(), " " * 11).lstrip(),
        f"backend:   {jax.default_backend()}",
        f"devices:   {tlog.describe_devices()}",
        f"processes: {jax.process_count()} (this is process {jax.process_index()})",
        f"cluster:   {cluster.describe()}",
    ]
    peak = tlog.peak_flops_per_device()
    if peak is not None:
        lines.append(f"peak:      {peak / 1e12:.1f} TFLOP/s bf16 per device")
    memory = tlog.device_memory()
    if memory:
        lines.append(f"memory:    {memory.get('memory_gb', 0):.2f} GB in use")
    return "\n".join(lines)
