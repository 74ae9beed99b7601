"""`train(config)`: the body of `titanax train`, from a loaded config to a trained
Trainer."""

from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import yaml

from .. import _distributed as distributed
from .. import loggers as tlog
from ..train import Trainer
from ._build import build_run, make_loggers
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


def train(config: Config, *, stream: TextIO | None = None) -> Any:
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
