"""What `titanax train`, `titanax explain` and `titanax info` do."""

from __future__ import annotations

import inspect
import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import yaml

from . import _distributed as distributed
from . import loggers as tlog
from ._errors import ConfigError
from ._explain import bytes_per_device, explain
from .config import Config, build_run, config_to_dict, make_loggers
from .train import Trainer

__all__ = [
    "explain_config",
    "info_text",
    "parse_bytes",
    "step_memory",
    "train_config",
]


def compact_config(config: Config) -> str:
    """The resolved config, one line per section (YAML flow style)."""
    lines = []
    for key, value in config_to_dict(config).items():
        text = yaml.safe_dump(
            value, default_flow_style=True, sort_keys=False, width=10**6
        )
        lines.append(f"{key}: {text.strip().removesuffix('...').strip()}")
    return "\n".join(lines)


def _param_count(model: Any) -> int:
    leaves = jax.tree.leaves(model)
    return sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape"))


def _run_info(config: Config, run: Any, cluster: distributed.Cluster) -> dict:
    params = _param_count(run.abstract_model)
    data = config.data
    source = data.function if data.source == "function" else data.path or "stdlib"
    tokens = f", {run.tokens_per_sample} tokens/sample" if run.tokens_per_sample else ""
    return {
        "model": f"{type(run.abstract_model).__name__}, {params:,} parameters",
        "data": f"{data.source} ({source}), global batch {data.batch_size}{tokens}",
        "cluster": cluster.describe(),
        "total_steps": config.steps,
        "config": compact_config(config),
    }


def _fit_takes_total() -> bool:
    # The Trainer contract's `fit(..., strict=...)` counts `steps` as a total; the
    # earlier `fit` counts steps from where the state is.
    return "strict" in inspect.signature(Trainer.fit).parameters


def _fit(trainer: Trainer, data: Any, until: int, resume: bool) -> Any:
    """Train until `state.step == until`, whichever `steps` meaning `fit` has."""
    if _fit_takes_total():
        return trainer.fit(data, steps=until, resume=resume)
    done = 0
    if resume and trainer.checkpoint is not None:
        done = trainer.checkpoint.latest_step() or 0
    elif trainer.state is not None:
        done = int(jax.device_get(trainer.state.step))
    if until <= done:
        return trainer.state
    return trainer.fit(data, steps=until - done, resume=resume)


def _save_config(config: Config) -> None:
    path = config.checkpoint.path
    if path and tlog.is_main_process():
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps(config_to_dict(config), indent=2) + "\n"
        )


def train_config(config: Config, *, stream: TextIO | None = None) -> Any:
    """Train from a config: the body of `titanax train`.

    Joins the multi-process run (`tx.distributed.initialize`), builds and checks the
    run (`build_run`, before any compilation), saves the resolved config as
    `config.json` beside the checkpoints, and trains `config.steps` steps in total.
    With `profile.start` set, steps `[start, start + profile.steps)` are traced.

    **Arguments:**

    - `config`: a loaded `Config`.
    - `stream`: where console loggers print (default stdout).

    **Returns:** the `Trainer` after training (`trainer.state` is the final state).
    """
    cluster = distributed.initialize()
    started = time.perf_counter()
    loggers = [tlog.WithHeader(x) for x in make_loggers(config, stream)]
    run = build_run(config, loggers=loggers)
    for logger in loggers:
        logger.extra.update(_run_info(config, run, cluster))
    trainer = run.trainer
    tlog.emit(loggers, "event", "check config", time.perf_counter() - started)
    _save_config(config)
    resume = config.checkpoint.resume
    profile = None
    if (start := config.profile.start) is not None:
        profile = tlog.Profile(start, config.profile.steps, config.profile.dir)
    try:
        started = time.perf_counter()
        trainer.init_state()
        tlog.emit(loggers, "event", "place model", time.perf_counter() - started)
        data = run.data.batches(0, run.plan, run.mesh)
        if profile is None:
            _fit(trainer, data, config.steps, resume)
        else:
            # Three legs: up to the window, the window (traced), the rest.
            _fit(trainer, data, min(profile.start, config.steps), resume)
            profile.before_step(int(jax.device_get(trainer.init_state().step)))
            _fit(trainer, data, min(profile.stop_at, config.steps), False)
            state = trainer.init_state()
            profile.after_step(profile.stop_at, state)
            profile.close()
            _fit(trainer, data, config.steps, False)
    finally:
        if profile is not None:
            profile.close()
        for logger in loggers:
            logger.close()
    return trainer


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
    """Per-device bytes of a compiled step, from `compiled.memory_analysis()`.

    **Returns:** `arguments`, `outputs`, `aliased` (outputs written over donated
    arguments), `temporaries`, `code`, and `peak` (arguments + outputs - aliased
    + temporaries + code: what the step needs at once).
    """
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = (
        out["arguments"]
        + out["outputs"]
        - out["aliased"]
        + out["temporaries"]
        + out["code"]
    )
    return out


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def explain_config(
    config: Config, *, device_memory: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Compile the step of a config ahead of time and report it, without training.

    The model and optimizer state are placed (each device holds only its shard),
    one batch is read, and the step is lowered and compiled for the configured mesh;
    nothing runs.

    **Arguments:**

    - `config`: a loaded `Config`.
    - `device_memory`: bytes per device to check the step against.

    **Returns:** `(text, report)`: the printable report (plan table, memory, FLOPs,
    collectives, fits or not) and its numbers as a dict (`memory` from
    `step_memory`, `flops_per_device`, `flops_per_step`, `devices`, `fits`,
    `compile_s`, `state_bytes_per_device`, `batch_bytes_per_device`).
    """
    run = build_run(config, loggers=[])
    trainer = run.trainer
    state = trainer.init_state()
    batch = next(iter(run.data.batches(0, run.plan, run.mesh)))
    started = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    memory = step_memory(compiled)
    flops = _flops(compiled)
    devices = run.mesh.size
    placed_batch = jax.tree.leaves(trainer.train_step.put_batch(batch))
    report: dict[str, Any] = {
        "devices": devices,
        "mesh": dict(run.mesh.shape),
        "memory": memory,
        "flops_per_device": flops,
        "flops_per_step": None if flops is None else flops * devices,
        "compile_s": compile_s,
        "state_bytes_per_device": bytes_per_device(trainer.train_step.flatten(state)),
        "batch_bytes_per_device": bytes_per_device(placed_batch),
        "fits": None if device_memory is None else memory["peak"] <= device_memory,
        "output_arrays": len(jax.tree.leaves(compiled.output_shardings)),
    }
    table = explain(
        state.model,
        run.plan,
        run.mesh,
        hlo_text=compiled.as_text(),
        extra_bytes_per_device={"optimizer state": bytes_per_device(state.opt_state)},
    )
    lines = [str(table), "", f"Compiled step ({compile_s:.2f} s), per device:"]
    for name in ("arguments", "outputs", "aliased", "temporaries", "code", "peak"):
        lines.append(f"  {name + ':':<13}{_gb(memory[name]):>14}")
    if flops is not None:
        lines.append(
            f"FLOPs per step: {flops:.4g} per device, {flops * devices:.4g} over "
            f"{devices} devices"
        )
        if run.tokens_per_sample:
            tokens = config.data.batch_size * run.tokens_per_sample
            lines.append(f"FLOPs per token: {flops * devices / tokens:.4g}")
    if device_memory is not None:
        verdict = "fits" if report["fits"] else "does NOT fit"
        share = 100 * memory["peak"] / device_memory
        lines.append(
            f"Device memory: the step {verdict} in {_gb(device_memory)} per device "
            f"(peak {_gb(memory['peak'])}, {share:.1f}%)."
        )
    return "\n".join(lines), report


# --- info -------------------------------------------------------------------------


def info_text() -> str:
    """`titanax info`: versions, devices, processes and the detected cluster."""
    cluster = distributed.detect()
    lines = [
        f"python:    {platform.python_version()} ({platform.platform()})",
        "versions:  " + " | ".join(f"{k} {v}" for k, v in tlog.versions().items()),
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
