"""`train(config)`: the body of `titanax train`, from a loaded config to a trained
Trainer."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import yaml

from .. import _distributed as distributed
from .. import loggers as tlog
from .._malloc import backend_started, configure_allocator
from ..train import Trainer
from ._build import Run, build_run, make_loggers
from ._load import config_to_dict
from ._schema import Config

__all__ = ["compact_config", "train"]


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


def _run_info(config: Config, run: Run, cluster: distributed.Cluster) -> dict:
    params = _param_count(run.abstract_model)
    data = config.data
    source = data.function if data.source == "function" else data.path or "stdlib"
    tokens = f", {run.tokens_per_sample} tokens/sample" if run.tokens_per_sample else ""
    order = f"shuffled (seed {data.seed})" if data.shuffle else "in order"
    return {
        "model": f"{type(run.abstract_model).__name__}, {params:,} parameters",
        "data": f"{data.source} ({source}), global batch {data.batch_size}{tokens}, "
        f"{run.data.samples_per_epoch:,} samples per epoch {order}",
        "cluster": cluster.describe(),
        "config": compact_config(config),
    }


def _save_config(config: Config) -> None:
    path = config.checkpoint.path
    if path and tlog.is_main_process():
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps(config_to_dict(config), indent=2) + "\n"
        )


def train(config: Config, *, stream: TextIO | None = None) -> Trainer:
    """Train from a config: the body of `titanax train`.

    Configures glibc's allocator for XLA:CPU (`tx.configure_allocator`, when JAX
    has not started yet, as in `titanax train`), joins the multi-process run
    (`tx.distributed.initialize`), builds and checks the run (`build_run`, before
    any compilation), saves the resolved config as `config.json` beside the
    checkpoints, and trains until `state.step == config.steps` (a total). With
    `checkpoint.resume` it continues the latest checkpoint at its step and at its
    global sample of the data. With `profile.start` set, steps
    `[start, start + profile.steps)` are traced.

    **Arguments:**

    - `config`: a loaded `Config`.
    - `stream`: where console loggers print (default stdout).

    **Returns:** the `Trainer` after training (`trainer.state` is the final state,
    `trainer.stop_reason` why it stopped).

    **Raises:** `ConfigError` for a config that does not fit the devices or the
    model; whatever `Trainer.fit` raises (`tx.Preempted` after saving, on SIGTERM).

    !!! Example

        ```python
        config = tx.config.load_config("run.yaml", ["steps=20"])
        state = tx.config.train(config).state
        ```
    """
    if not backend_started():
        # First, in a fresh process (`titanax train`): glibc then keeps XLA:CPU's
        # per-step buffers mapped instead of page-faulting them in every step
        # (titanax/_malloc.py). A program that has already run JAX keeps its
        # allocator: its threads hold their own malloc arenas by now.
        configure_allocator()
    cluster = distributed.initialize()
    started = time.perf_counter()
    loggers = [tlog.WithHeader(x) for x in make_loggers(config, stream)]
    run = build_run(config, loggers=loggers)
    for logger in loggers:
        logger.extra.update(_run_info(config, run, cluster))
    trainer = run.trainer
    tlog.emit(loggers, "event", "check config", time.perf_counter() - started)
    _save_config(config)
    try:
        trainer.fit(run.data, steps=config.steps, resume=config.checkpoint.resume)
    finally:
        if trainer.profile is not None:
            trainer.profile.close()  # a run that ended inside the window
        for logger in loggers:
            logger.close()
    return trainer
