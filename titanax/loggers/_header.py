"""The run header: versions, devices, mesh, plan and optimizer."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import jax

from .._versions import versions


def describe_devices() -> str:
    """The devices JAX sees, e.g. `8 x cpu` or `8 x NVIDIA H100 80GB HBM3`.

    **Returns:**

    Counts per device kind, joined by `, `, with `over N processes` when there
    is more than one process.
    """
    kinds = collections.Counter(d.device_kind for d in jax.devices())
    text = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    if jax.process_count() > 1:
        text += f" over {jax.process_count()} processes"
    return text


def _describe_mesh(mesh: Any) -> str:
    shape = getattr(mesh, "shape", None)
    if isinstance(shape, Mapping):
        return ", ".join(f"{axis}={size}" for axis, size in shape.items())
    return str(mesh)


def run_header(
    *, mesh: Any = None, plan: Any = None, optimizer: Any = None, **extra: object
) -> dict[str, object]:
    """The `info` a trainer passes to `Logger.header`, in display order.

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh` (shown as `data=2, model=4`), or `None`.
    - `plan`: a plan; shown with its `describe()` method if it has one.
    - `optimizer`: an optimizer (shown with `tx.optim.describe_optimizer`) or text.
    - `**extra`: more entries, appended as given (e.g. `model="GPT 12M params"`).

    **Returns:**

    A dict with `versions` (a dict), `devices`, then `mesh`, `plan` and
    `optimizer` when given, then `extra`.
    """
    info: dict[str, object] = {"versions": versions(), "devices": describe_devices()}
    if mesh is not None:
        info["mesh"] = _describe_mesh(mesh)
    if plan is not None:
        describe = getattr(plan, "describe", None)
        info["plan"] = describe() if callable(describe) else str(plan)
    if optimizer is not None:
        if isinstance(optimizer, str):
            info["optimizer"] = optimizer
        else:
            from ..optim import describe_optimizer

            info["optimizer"] = describe_optimizer(optimizer)
    info.update(extra)
    return info
