"""Host batches → global arrays sharded over the plan's data axes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._axes import path_str
from .._errors import TrainerError
from .._plan import Plan

__all__ = ["BatchSpec", "place_leaves", "put_batch"]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The structure every batch of a run must have: treedef, per-leaf global shape
    and dtype. The first batch fixes it; a different one is an error, not a silent
    recompilation."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    paths: tuple[str, ...]

    def check(self, treedef: Any, leaves: list[Any]) -> None:
        """Raise `TrainerError` naming the first leaf that differs."""
        if treedef != self.treedef:
            raise TrainerError(
                f"This batch's structure {treedef} differs from the first batch's "
                f"{self.treedef}.",
                suggestion="Yield batches with the same keys/structure every step.",
            )
        for path, shape, dtype, leaf in zip(
            self.paths, self.shapes, self.dtypes, leaves, strict=True
        ):
            # Attribute reads only: this runs on the host every step.
            if leaf.shape != shape or leaf.dtype != dtype:
                raise TrainerError(
                    f"Batch leaf `{path}` has shape {tuple(leaf.shape)} and dtype "
                    f"{leaf.dtype}, but the first batch had {shape} and {dtype}.",
                    path=path,
                    suggestion=(
                        "Keep batch shapes fixed (drop or pad the last partial batch); "
                        "a new shape would recompile the step."
                    ),
                )


def _leaf_paths(batch: Any) -> tuple[str, ...]:
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    return tuple(
        path_str(batch, p).removeprefix(type(batch).__name__) or "batch"
        for p, _ in flat
    )


def batch_shardings(leaves: list[Any], plan: Plan, mesh: Mesh) -> list[NamedSharding]:
    """One `NamedSharding` per batch leaf: leading dim over the data axes."""
    return [NamedSharding(mesh, plan.batch_spec(np.ndim(x))) for x in leaves]


def check_batch_divides(
    batch: Any, plan: Plan, mesh: Mesh, *, accumulate: bool = True
) -> None:
    """Raise `TrainerError` unless every leaf's leading (global) dim splits over the
    data axes (and, with `accumulate`, into `plan.accumulate_steps` microbatches)."""
    acc = plan.accumulate_steps if accumulate else 1
    need = plan.data_parallel_size(mesh) * acc
    paths = _leaf_paths(batch)
    for path, leaf in zip(paths, jax.tree.leaves(batch), strict=True):
        if np.ndim(leaf) == 0:
            raise TrainerError(
                f"Batch leaf `{path}` is a scalar; batch leaves need a leading "
                "batch dim.",
                path=path,
                suggestion="Give every batch leaf a leading batch dimension.",
            )
        size = np.shape(leaf)[0]
        if size % need:
            over = " x ".join(f"{a}={mesh.shape[a]}" for a in plan.data_axes) or "1"
            detail = f", times {acc} microbatches," if acc > 1 else ""
            raise TrainerError(
                f"The global batch of {size} rows at `{path}` does not split into "
                f"{need} equal parts (data axes {over}{detail}).",
                path=path,
                suggestion=f"Use a global batch size divisible by {need}.",
            )


def put_batch(batch: Any, plan: Plan, mesh: Mesh, *, accumulate: bool = True) -> Any:
    """Place a host batch as global arrays sharded over the plan's data axes.

    On many hosts each process passes its own slice of the global batch (its rows, in
    process order); the result is one global `jax.Array` per leaf, built with
    `jax.make_array_from_process_local_data`.

    **Arguments:**

    - `batch`: a PyTree of numpy (or jax) arrays with a leading batch dim.
    - `plan`, `mesh`: the layout; the leading dim is split over `plan.data_axes`.
    - `accumulate`: also require the rows to split into `plan.accumulate_steps`
        microbatches (a training batch); `False` for evaluation batches.

    **Returns:** the batch as sharded global `jax.Array`s.

    **Raises:** `TrainerError` if a leaf's leading dim does not split evenly.
    """
    if jax.process_count() == 1:
        check_batch_divides(batch, plan, mesh, accumulate=accumulate)  # pre-transfer
    leaves, treedef = jax.tree.flatten(batch)
    shardings = batch_shardings(leaves, plan, mesh)
    if jax.process_count() == 1:
        placed = place_leaves(leaves, shardings)
    else:
        placed = [
            global_array(leaf, sharding)
            for leaf, sharding in zip(leaves, shardings, strict=True)
        ]
    placed_batch = jax.tree.unflatten(treedef, placed)
    if jax.process_count() > 1:
        # The global shapes, still before any step.
        check_batch_divides(placed_batch, plan, mesh, accumulate=accumulate)
    return placed_batch


def place_leaves(leaves: list[Any], shardings: list[NamedSharding]) -> list[jax.Array]:
    """Place host arrays on this process's devices with the given shardings.

    Numpy leaves go through a jitted identity with pinned in/out shardings: jit's
    C++ dispatch copies and splits them, several times faster than `jax.device_put`
    for small batches (benchmarks/RESULTS.md), and it copies the host memory, where
    `jax.device_put` on CPU may alias it (a data loader reusing its numpy buffers
    would then rewrite batches already placed). Other leaves use `jax.device_put`.
    """
    if all(type(x) is np.ndarray for x in leaves):
        return _placer(tuple(shardings))(list(leaves))
    return jax.device_put(list(leaves), list(shardings))


def global_array(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """On many hosts: the global array of which `leaf` is this process's rows."""
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
        return leaf  # already a global array laid out as asked
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))


@functools.lru_cache(maxsize=64)
def _placer(shardings: tuple[NamedSharding, ...]) -> Any:
    def _place_batch(leaves: list[jax.Array]) -> list[jax.Array]:
        return leaves

    # Donating the freshly transferred input lets the output reuse its buffers.
    return jax.jit(
        _place_batch,
        in_shardings=(list(shardings),),
        out_shardings=list(shardings),
        donate_argnums=(0,),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())
