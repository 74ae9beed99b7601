"""Configured Trainers in one call: `tx.quickstart.simple_data_parallel(...)` and
`tx.quickstart.simple_tensor_parallel(...)`.

Each builds the mesh, the plan, an AdamW optimizer and console logging, and returns
a `tx.Trainer`: call `.fit(data, steps=...)`. Pass any other `tx.Trainer` keyword
through (`precision=`, `checkpoint=`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from . import optim
from ._errors import MeshError
from ._mesh import make_mesh
from ._plan import DP, TP, Plan
from .train import Trainer

__all__ = ["simple_data_parallel", "simple_tensor_parallel"]


def simple_data_parallel(
    model: Any,
    loss: Any,
    *,
    optimizer: Any = None,
    lr: float = 1e-3,
    devices: Sequence[Any] | None = None,
    axis: str = "data",
    loggers: Sequence[Any] | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """A Trainer that splits each batch over every device (data parallelism).

    **Arguments:**

    - `model`: an `eqx.Module` or a `key -> eqx.Module` function.
    - `loss`: `loss(model, batch, key) -> loss | (loss, metrics)`.
    - `optimizer`: an Optax transformation; default `tx.optim.adamw(lr)`.
    - `lr`: the learning rate of the default optimizer.
    - `devices`: the devices to use; default all.
    - `axis`: the mesh axis name.
    - `loggers`: default (None) the Trainer's: a progress bar on a terminal,
        `tx.loggers.Basic()` lines otherwise.
    - `**trainer_kwargs`: more `tx.Trainer` arguments.

    **Returns:** a `tx.Trainer` over the mesh `{axis: len(devices)}`.

    !!! Example

        ```python
        trainer = tx.quickstart.simple_data_parallel(make_model, loss_fn, lr=3e-4)
        state = trainer.fit(batches, steps=1000)
        ```
    """
    mesh = make_mesh(devices, **{axis: -1})
    return Trainer(
        model,
        Plan(dp=DP(axis)),
        optimizer=optim.adamw(lr) if optimizer is None else optimizer,
        loss=loss,
        mesh=mesh,
        loggers=loggers,
        **trainer_kwargs,
    )


def simple_tensor_parallel(
    model: Any,
    loss: Any,
    *,
    rules: Mapping[str, str | None] | None = None,
    tp: int | None = None,
    optimizer: Any = None,
    lr: float = 1e-3,
    devices: Sequence[Any] | None = None,
    data_axis: str = "data",
    model_axis: str = "model",
    loggers: Sequence[Any] | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """A Trainer with Megatron tensor parallelism over `tp` devices, and data
    parallelism over the rest.

    **Arguments:**

    - `model`: an `eqx.Module` or a `key -> eqx.Module` function whose arrays name
        their logical axes.
    - `loss`: `loss(model, batch, key) -> loss | (loss, metrics)`.
    - `rules`: logical axis → `model_axis` (or None), as `tx.TP(rules=...)`; default
        `mlp`, `heads` and `vocab`.
    - `tp`: the tensor-parallel degree; default all devices. It must divide the
        device count; the other factor is the data-parallel degree.
    - `optimizer`, `lr`, `devices`, `loggers`: as in `simple_data_parallel`.
    - `data_axis`, `model_axis`: the mesh axis names.
    - `**trainer_kwargs`: more `tx.Trainer` arguments.

    **Returns:** a `tx.Trainer` over the mesh `{data_axis: n // tp, model_axis:
    tp}` (without the data axis when `tp` is every device).

    **Raises:** `MeshError` when `tp` does not divide the device count.

    !!! Example

        ```python
        trainer = tx.quickstart.simple_tensor_parallel(
            make_model, loss_fn, rules={"mlp": "model"}, tp=4
        )
        ```
    """
    pool = list(jax.devices() if devices is None else devices)
    degree = len(pool) if tp is None else tp
    if isinstance(degree, bool) or degree < 1 or len(pool) % degree:
        raise MeshError(
            f"Expected `tp` to divide the {len(pool)} devices, got {tp!r}.",
            suggestion="Pass a `tp` that divides the device count, e.g. "
            f"{len(pool)} or 1.",
        )
    replicas = len(pool) // degree
    if replicas > 1:
        mesh = make_mesh(pool, **{data_axis: replicas, model_axis: degree})
        plan = Plan(dp=DP(data_axis), tp=TP(model_axis, rules))
    else:
        mesh = make_mesh(pool, **{model_axis: degree})
        plan = Plan(tp=TP(model_axis, rules))
    return Trainer(
        model,
        plan,
        optimizer=optim.adamw(lr) if optimizer is None else optimizer,
        loss=loss,
        mesh=mesh,
        loggers=loggers,
        **trainer_kwargs,
    )
