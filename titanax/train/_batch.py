"""Host batches → global arrays sharded over the plan's data axes.

A `BatchLayout` is what every batch of a run must look like (structure, per-leaf
shape and dtype, placement). It is derived from one batch, checked against every
other before anything is donated: a bad batch raises `BatchError` and leaves the
state intact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._axes import path_str
from .._errors import BatchError
from .._plan import Plan

__all__ = ["BatchLayout", "ShortBatch", "place_leaves", "put_batch", "replicated"]


class ShortBatch(BatchError):
    """A batch with fewer rows than the layout's, and otherwise the same: the last,
    partial batch of an epoch. The Trainer drops it (`drop_last=True`)."""


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """The structure every batch of a run has: treedef, per-leaf global shape and
    dtype, and the sharding each leaf is placed with (leading dim over the data
    axes). Immutable; equal layouts compile to the same step.

    **Fields:** `treedef`, `shapes`, `dtypes`, `paths` (readable leaf paths),
    `shardings`, `many_processes`, and the property `rows` (the global batch
    size: the leading dim).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    paths: tuple[str, ...] = dataclasses.field(compare=False)
    shardings: tuple[NamedSharding, ...] = dataclasses.field(compare=False)
    many_processes: bool = dataclasses.field(compare=False, default=False)

    @property
    def rows(self) -> int:
        """The global batch size (every leaf's leading dim)."""
        return self.shapes[0][0]

    @classmethod
    def of(
        cls, batch: Any, plan: Plan, mesh: Mesh, *, accumulate: bool = True
    ) -> BatchLayout:
        """The layout of `batch`: checks that it has leaves, each with a leading
        batch dim of one size that splits over the data axes (and, with
        `accumulate`, into `plan.accumulate_steps` microbatches).

        On many processes, `batch` holds this process's rows; the layout records
        global shapes (rows times the process count).

        **Raises:** `BatchError` naming the leaf and the fix.
        """
        leaves, treedef = jax.tree.flatten(batch)
        paths = leaf_paths(batch)
        if not leaves:
            raise BatchError(
                f"Expected a batch with at least one array, got {type(batch).__name__}"
                f" {batch!r:.60}.",
                suggestion="Yield PyTrees of numpy arrays, e.g. `{'x': x, 'y': y}`.",
            )
        leaves = [x if hasattr(x, "shape") else np.asarray(x) for x in leaves]
        for path, leaf in zip(paths, leaves, strict=True):
            if np.ndim(leaf) == 0:
                raise BatchError(
                    f"Expected every batch leaf to have a leading batch dim, got a "
                    f"scalar at `{path}`.",
                    path=path,
                    suggestion="Give every batch leaf a leading batch dimension.",
                )
        shardings = tuple(NamedSharding(mesh, plan.batch_spec(x.ndim)) for x in leaves)
        if jax.process_count() > 1:
            # Each process holds its rows: the global shapes are those of the global
            # arrays they make together (rows may be shared by processes that hold
            # the same data shard).
            leaves = [
                global_array(x, s) for x, s in zip(leaves, shardings, strict=True)
            ]
        shapes = [tuple(x.shape) for x in leaves]
        rows = {s[0] for s in shapes}
        if len(rows) > 1:
            sizes = ", ".join(
                f"`{p}`: {s[0]}" for p, s in zip(paths, shapes, strict=True)
            )
            raise BatchError(
                f"Expected every batch leaf to have the same number of rows, got "
                f"{sizes}.",
                path=paths[0],
                suggestion="Give all leaves of a batch the same leading dim.",
            )
        check_rows(shapes[0][0], paths[0], plan, mesh, accumulate=accumulate)
        return cls(
            treedef=treedef,
            shapes=tuple(shapes),
            dtypes=tuple(np.dtype(x.dtype) for x in leaves),
            paths=paths,
            shardings=shardings,
            many_processes=jax.process_count() > 1,
        )

    def leaves(self, batch: Any) -> list[Any]:
        """`batch`'s leaves, checked against this layout (per step: attribute reads
        only).

        **Raises:** `ShortBatch` for a batch with fewer rows and otherwise the same;
        `BatchError` naming the first leaf that differs.
        """
        leaves, treedef = jax.tree.flatten(batch)
        if treedef != self.treedef:
            raise BatchError(
                f"Expected a batch with the structure {self.treedef}, got {treedef}.",
                suggestion="Yield batches with the same keys/structure every step.",
            )
        if self.many_processes:
            return self._process_leaves(leaves)
        shapes = self.shapes
        dtypes = self.dtypes
        for i, leaf in enumerate(leaves):
            if leaf.shape != shapes[i] or leaf.dtype != dtypes[i]:
                self._raise_mismatch(leaves)
        return leaves

    def _process_leaves(self, leaves: list[Any]) -> list[Any]:
        """Many processes: each holds its rows; build the global arrays (before
        any step) and check those."""
        placed = [
            global_array(x, s) for x, s in zip(leaves, self.shardings, strict=True)
        ]
        for leaf, shape, dtype in zip(placed, self.shapes, self.dtypes, strict=True):
            if leaf.shape != shape or leaf.dtype != dtype:
                self._raise_mismatch(placed)
        return placed

    def _raise_mismatch(self, leaves: list[Any]) -> None:
        shapes = list(self.shapes)
        got = [(tuple(x.shape), np.dtype(x.dtype)) for x in leaves]
        short = (
            all(
                dtype == want_dtype
                and shape[1:] == want[1:]
                and len(shape) == len(want)
                and 0 < shape[0] < want[0]
                for (shape, dtype), want, want_dtype in zip(
                    got, shapes, self.dtypes, strict=True
                )
            )
            and len({shape[0] for shape, _ in got}) == 1
        )
        for path, (shape, dtype), want, want_dtype in zip(
            self.paths, got, shapes, self.dtypes, strict=True
        ):
            if shape == want and dtype == want_dtype:
                continue
            kind = ShortBatch if short else BatchError
            raise kind(
                f"Expected batch leaf `{path}` of shape {want} and dtype "
                f"{want_dtype} (as the first batch), got {shape} and {dtype}.",
                path=path,
                suggestion=(
                    "Drop the partial last batch (`fit(..., drop_last=True)`, the "
                    "default) or pad it to the full size."
                    if short
                    else "Keep batch shapes and dtypes fixed; a new shape would "
                    "recompile the step."
                ),
            )


def leaf_paths(batch: Any) -> tuple[str, ...]:
    """Readable paths of a batch's leaves: `['x']`, `[0]`, or `batch` for a bare
    array."""
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    return tuple(
        path_str(batch, p).removeprefix(type(batch).__name__) or "batch"
        for p, _ in flat
    )


def check_rows(
    rows: int, path: str, plan: Plan, mesh: Mesh, *, accumulate: bool = True
) -> None:
    """Raise `BatchError` unless `rows` (global) split over the data axes (and,
    with `accumulate`, into `plan.accumulate_steps` microbatches)."""
    acc = plan.accumulate_steps if accumulate else 1
    need = plan.data_parallel_size(mesh) * acc
    if rows % need:
        over = " x ".join(f"{a}={mesh.shape[a]}" for a in plan.data_axes) or "1"
        detail = f", times {acc} microbatches," if acc > 1 else ""
        raise BatchError(
            f"Expected a global batch size divisible by {need} (data axes {over}"
            f"{detail}), got {rows} rows at `{path}`.",
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

    **Raises:** `BatchError` if a leaf's leading dim does not split evenly.
    """
    layout = BatchLayout.of(batch, plan, mesh, accumulate=accumulate)
    leaves = jax.tree.leaves(batch)
    if jax.process_count() == 1:
        placed = place_leaves(leaves, list(layout.shardings))
    else:
        placed = [
            global_array(x, s) for x, s in zip(leaves, layout.shardings, strict=True)
        ]
    return jax.tree.unflatten(layout.treedef, placed)


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
