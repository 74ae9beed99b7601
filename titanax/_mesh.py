"""Meshes: naming the device grid.

Titanax builds meshes with **Auto** axis types (`jax.sharding.AxisType.Auto`), not the
`Explicit` default of `jax.make_mesh`. Why: the compiled step is a `jax.jit` with
`in_shardings`/`out_shardings` taken from the plan and XLA propagates shardings through
the model, which is how Megatron-style tensor parallelism falls out of weight
shardings alone. Under Explicit axes, plain indexing of a sharded array can raise
`ShardingTypeError`, `jax.shard_map` refuses inputs whose sharding differs from its
`in_specs`, and some Orbax versions fail to save or restore.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ._compat import auto_mesh, backends_initialized
from ._errors import MeshError

__all__ = ["MeshSpec", "make_mesh", "simulate_cpu_devices"]

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(n: int) -> None:
    """Make JAX's CPU backend expose `n` devices, for trying plans on a laptop.

    Call it before JAX runs anything (before the first array is created); it sets
    `XLA_FLAGS=--xla_force_host_platform_device_count=n` and `jax_num_cpu_devices`.

    **Arguments:**

    - `n`: how many CPU devices to simulate (≥ 1).

    **Raises:** `MeshError` if JAX's backends were already initialised with a
    different number of CPU devices: set it at the top of your script instead.

    !!! Example
        ```python
        import titanax as tx
        tx.simulate_cpu_devices(8)
        mesh = tx.make_mesh(data=2, model=4)
        ```
    """
    if not isinstance(n, int) or n < 1:
        raise MeshError(
            f"`simulate_cpu_devices` expects a positive int, got {n!r}.",
            suggestion="Pass a device count, e.g. `simulate_cpu_devices(8)`.",
        )
    if backends_initialized():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise MeshError(
            f"JAX was already initialised with {have} CPU device(s); "
            f"`simulate_cpu_devices({n})` can no longer change that.",
            suggestion=(
                "Call `tx.simulate_cpu_devices(n)` at the top of your script, before "
                "any JAX computation, or set "
                f"`XLA_FLAGS={_COUNT_FLAG}={n}` in the environment."
            ),
        )
    flags = re.sub(rf"{_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} {_COUNT_FLAG}={n}".strip()
    jax.config.update("jax_num_cpu_devices", n)


def _ordered_devices(devices: Sequence[Any] | None) -> list[Any]:
    """Devices sorted by (process index, id): the same order on every host."""
    devices = list(jax.devices() if devices is None else devices)
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def _resolve_sizes(axis_sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    for name, size in axis_sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise MeshError(
                f"Mesh axis `{name}` must have a positive size or -1, got {size!r}.",
                suggestion="Use a positive int, or -1 to fill the remaining devices.",
            )
    fills = [name for name, size in axis_sizes.items() if size == -1]
    if len(fills) > 1:
        raise MeshError(
            f"Only one mesh axis may be -1, got {fills}.",
            suggestion="Give every axis but one an explicit size.",
        )
    fixed = math.prod(size for size in axis_sizes.values() if size != -1)
    sizes = dict(axis_sizes)
    if fills:
        if n_devices % fixed:
            raise MeshError(
                f"Cannot fill axis `{fills[0]}`: {n_devices} devices are not divisible "
                f"by the other axes' product {fixed} ({_factors(axis_sizes)}).",
                suggestion="Choose axis sizes whose product divides the device count.",
            )
        sizes[fills[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total != n_devices:
        raise MeshError(
            f"The mesh {_factors(sizes)} = {total} devices, but {n_devices} "
            "device(s) are available.",
            suggestion=(
                "Make the product of the axis sizes equal the device count, use -1 "
                "for one axis to fill the rest, or call `tx.simulate_cpu_devices(n)` "
                "first to try a larger mesh on CPU."
            ),
        )
    return sizes


def _factors(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


def make_mesh(devices: Sequence[Any] | None = None, **axis_sizes: int) -> Mesh:
    """Build a device mesh from named axis sizes.

    **Arguments:**

    - `devices`: the devices to use; all of `jax.devices()` by default. They are sorted
        by process index, then id, so every host builds the same mesh.
    - `**axis_sizes`: one keyword per mesh axis, in order, outermost first, e.g.
        `data=2, model=4`. One axis may be `-1` to take the remaining devices.

    **Returns:** a `jax.sharding.Mesh` with `Auto` axis types.

    **Raises:** `MeshError` when the sizes do not multiply to the device count.

    !!! Example
        ```python
        mesh = tx.make_mesh(data=-1, model=4)  # 8 devices → data=2, model=4
        ```
    """
    if not axis_sizes:
        raise MeshError(
            "`make_mesh` needs at least one named axis, got none.",
            suggestion="Name the axes, e.g. `tx.make_mesh(data=-1)`.",
        )
    ordered = _ordered_devices(devices)
    sizes = _resolve_sizes(axis_sizes, len(ordered))
    grid = np.array(ordered, dtype=object).reshape(tuple(sizes.values()))
    return auto_mesh(grid, tuple(sizes))


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A mesh's named axes, with per-process views for multi-host code.

    Build it from a mesh with `MeshSpec.of(mesh)`, or describe one to build later with
    `MeshSpec.from_sizes(data=-1, model=4).build()`.

    **Fields:**

    - `axis_names`: the mesh axes, outermost first.
    - `axis_sizes`: their sizes (`-1` allowed before `build`).
    - `mesh`: the built `jax.sharding.Mesh`, or `None` for an unbuilt spec.
    """

    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]
    mesh: Mesh | None = None

    @classmethod
    def from_sizes(cls, **axis_sizes: int) -> MeshSpec:
        """A spec of named sizes, not yet bound to devices."""
        return cls(tuple(axis_sizes), tuple(axis_sizes.values()))

    @classmethod
    def of(cls, mesh: Mesh) -> MeshSpec:
        """The spec of an existing mesh."""
        return cls(tuple(mesh.axis_names), tuple(mesh.devices.shape), mesh)

    def build(self, devices: Sequence[Any] | None = None) -> MeshSpec:
        """Bind the spec to devices (resolving `-1`); returns a spec with `.mesh`."""
        sizes = dict(zip(self.axis_names, self.axis_sizes, strict=True))
        return MeshSpec.of(make_mesh(devices, **sizes))

    def _built(self) -> Mesh:
        if self.mesh is None:
            raise MeshError(
                "This MeshSpec is not bound to devices yet.",
                suggestion="Call `.build()` first, or use `MeshSpec.of(mesh)`.",
            )
        return self.mesh

    def _check_axis(self, axis: str) -> int:
        if axis not in self.axis_names:
            raise MeshError(
                f"The mesh has no axis `{axis}`; its axes are {self.axis_names}.",
                suggestion=f"Use one of {self.axis_names}.",
            )
        return self.axis_names.index(axis)

    @property
    def shape(self) -> dict[str, int]:
        """`{axis: size}`, outermost first."""
        return dict(zip(self.axis_names, self.axis_sizes, strict=True))

    def size(self, axis: str) -> int:
        """How many devices lie along `axis`."""
        return self.axis_sizes[self._check_axis(axis)]

    def coords(self) -> dict[str, int]:
        """This process's coordinates: those of its first local device."""
        mesh = self._built()
        here = jax.process_index()
        grid = mesh.devices
        for index in np.ndindex(grid.shape):
            device: Any = grid[index]
            if device.process_index == here:
                return dict(zip(self.axis_names, map(int, index), strict=True))
        raise MeshError(
            f"No device of process {here} is in this mesh.",
            suggestion="Build the mesh from all devices (`jax.devices()`).",
        )

    def rank(self, axis: str) -> int:
        """This process's coordinate along `axis`."""
        self._check_axis(axis)
        return self.coords()[axis]

    def validate_compatibility(
        self, batch_size: int, data_axes: Sequence[str] | None = None
    ) -> None:
        """Check that a global batch splits evenly over the data axes.

        **Arguments:**

        - `batch_size`: the global batch size.
        - `data_axes`: the mesh axes the batch is split over (default: all axes
            named `data` or `fsdp` that the mesh has).

        **Raises:** `MeshError` naming the sizes and a fix.
        """
        if data_axes is None:
            data_axes = [a for a in self.axis_names if a in ("data", "fsdp")]
        split = math.prod(self.size(a) for a in data_axes)
        if batch_size % split:
            over = " x ".join(f"{a}={self.size(a)}" for a in data_axes)
            # The nearest multiples below and above (two distinct ones when the
            # batch is smaller than `split`).
            lower = batch_size - batch_size % split or split
            raise MeshError(
                f"The global batch of {batch_size} does not split over the data "
                f"axes {over} ({split} shards).",
                suggestion=(
                    f"Use a batch size divisible by {split}, e.g. {lower} "
                    f"or {lower + split}."
                ),
            )

    def describe(self) -> str:
        """One line: axes, sizes, device kind and process count."""
        axes = " x ".join(f"{n}={s}" for n, s in self.shape.items())
        if self.mesh is None:
            return f"mesh {axes} (not built)"
        devices = self.mesh.devices.flat
        first = next(iter(devices))
        processes = len({d.process_index for d in self.mesh.devices.flat})
        return (
            f"mesh {axes} over {self.mesh.devices.size} {first.platform} device(s) "
            f"in {processes} process(es)"
        )
