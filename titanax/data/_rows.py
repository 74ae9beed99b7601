"""Which rows of a global batch each process reads, from the mesh and the plan.

The batch's leading dim is split over the plan's data axes
(`NamedSharding(mesh, plan.batch_spec(1))`). A process needs exactly the rows that
live on its own devices; `jax.make_array_from_process_local_data` expects them as
the distinct row blocks of those devices, in increasing order, concatenated. The
rows depend on the mesh and the plan only, never on how many processes read: the
global batch is the same whatever the process count.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .._errors import DataError
from .._plan import Plan

__all__ = ["check_batch_size", "process_rows"]


def check_batch_size(
    batch_size: int, plan: Plan, mesh: Mesh, *, accumulate: bool = True
) -> None:
    """Raise `DataError` unless `batch_size` splits evenly over the plan's data axes
    (times `plan.accumulate_steps` microbatches with `accumulate`)."""
    plan.check_mesh(mesh)
    acc = plan.accumulate_steps if accumulate else 1
    need = plan.data_parallel_size(mesh) * acc
    if batch_size % need:
        over = " x ".join(f"{a}={mesh.shape[a]}" for a in plan.data_axes) or "1"
        detail = f", times {acc} microbatches," if acc > 1 else ""
        lower = batch_size - batch_size % need
        raise DataError(
            f"Expected a global batch size divisible by {need} (data axes "
            f"{over}{detail}), got {batch_size}.",
            suggestion=f"Use a global batch size that is a multiple of {need} "
            f"(e.g. {lower or need} or {lower + need}), or change the data axes.",
        )


def _block(rows: slice, size: int) -> tuple[int, int]:
    """A device's `[start, stop)` rows from its index slice (`None`: unbounded)."""
    return (rows.start or 0, size if rows.stop is None else rows.stop)


def process_rows(
    batch_size: int,
    plan: Plan,
    mesh: Mesh,
    devices: Collection[Any] | None = None,
) -> np.ndarray:
    """The rows of every global batch that one process reads, in the order
    `jax.make_array_from_process_local_data` expects them.

    **Arguments:**

    - `batch_size`: the global batch size `B`.
    - `plan`, `mesh`: the layout; the batch's leading dim is split over
        `plan.data_axes`.
    - `devices`: the devices of the process (default: this process's devices of
        `mesh`). Pass a subset of a simulated mesh's devices to see what a process
        of a larger run would read.

    **Returns:** a sorted `int64` array of row indices in `[0, B)`: the distinct row
    blocks of the process's devices, concatenated. Processes whose devices hold the
    same blocks (replicas along a non-data axis) get the same rows.

    **Raises:** `DataError` if the data axes do not divide `B`, or if the process
    owns no device of `mesh`; `PlanError` for a data axis the mesh lacks.

    !!! Example
        ```python
        mesh = tx.make_mesh(data=8)
        plan = tx.Plan(dp=tx.DP("data"))
        first_process = list(mesh.devices.flat)[:4]
        tx.data.process_rows(16, plan, mesh, first_process)  # rows 0..7
        ```
    """
    check_batch_size(batch_size, plan, mesh, accumulate=False)
    if devices is None:
        me = jax.process_index()
        devices = [d for d in mesh.devices.flat if d.process_index == me]
    owned = set(devices)
    sharding = NamedSharding(mesh, plan.batch_spec(1))
    index_map = sharding.devices_indices_map((batch_size,))
    blocks = sorted(
        {
            _block(index[0], batch_size)
            for device, index in index_map.items()
            if device in owned
        }
    )
    if not blocks:
        raise DataError(
            f"Expected this process to own at least one device of the mesh "
            f"({mesh.devices.size} devices), got none of them.",
            suggestion="Build the mesh over every process's devices "
            "(`tx.make_mesh` uses `jax.devices()`, all processes).",
        )
    return np.concatenate([np.arange(a, b) for a, b in blocks])
