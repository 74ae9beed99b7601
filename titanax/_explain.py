"""`tx.explain`: a plan, made visible — one row per parameter, bytes per device."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._axes import is_arraylike, logical_axes, path_str
from ._hlo import Collective, collectives
from ._plan import Plan
from ._sharding import shardings
from ._units import format_bytes

__all__ = ["Explanation", "ParamRow", "explain"]


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter: `path`, `shape`, `dtype`, `logical` axes, mesh `spec`,
    `shard_shape` and `bytes_per_device`."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    logical: tuple[str | None, ...]
    spec: PartitionSpec
    shard_shape: tuple[int, ...]
    bytes_per_device: int


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `tx.explain` found. `str(explanation)` is the readable report.

    **Fields:**

    - `plan`, `mesh`: as given.
    - `params`: one `ParamRow` per array.
    - `param_bytes_per_device`: parameter bytes each device holds.
    - `param_bytes_total`: bytes of the whole, unsharded model.
    - `extra_bytes_per_device`: further per-device byte counts by name
        (`"grads"`, `"optimizer state"`, ...), when known.
    - `collectives`: the collectives of a compiled step, when given.
    """

    plan: Plan
    mesh: Mesh
    params: tuple[ParamRow, ...]
    param_bytes_per_device: int
    param_bytes_total: int
    extra_bytes_per_device: dict[str, int] = dataclasses.field(default_factory=dict)
    collectives: tuple[Collective, ...] = ()

    def collective_summary(self) -> dict[tuple[str, tuple[str, ...], bool], list[int]]:
        """`(kind, axes, in_loop) -> [count, bytes]` over `collectives`."""
        summary: dict[tuple[str, tuple[str, ...], bool], list[int]] = defaultdict(
            lambda: [0, 0]
        )
        for c in self.collectives:
            entry = summary[(c.kind, c.axes, c.in_loop)]
            entry[0] += 1
            entry[1] += c.bytes
        return dict(summary)

    def __str__(self) -> str:
        spec = " x ".join(f"{n}={s}" for n, s in self.mesh.shape.items())
        lines = [f"Plan: {self.plan.describe()}", f"Mesh: {spec}", ""]
        header = ("path", "shape", "logical axes", "mesh spec", "bytes/device")
        rows = [
            (
                r.path,
                str(r.shape),
                "(" + ", ".join(str(n) for n in r.logical) + ")",
                str(tuple(r.spec)),
                format_bytes(r.bytes_per_device),
            )
            for r in self.params
        ]
        widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            cells = (x.ljust(w) for x, w in zip(row, widths, strict=True))
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        lines.append(
            f"params per device: {format_bytes(self.param_bytes_per_device)} "
            f"of {format_bytes(self.param_bytes_total)} "
            f"({self.param_bytes_per_device / max(self.param_bytes_total, 1):.1%})"
        )
        for name, value in self.extra_bytes_per_device.items():
            lines.append(f"{name} per device: {format_bytes(value)}")
        if self.collectives:
            lines.append("")
            lines.append("collectives per step (kind, mesh axes, count, bytes/device):")
            for (kind, axes, in_loop), (count, nbytes) in sorted(
                self.collective_summary().items()
            ):
                where = " inside a loop" if in_loop else ""
                over = ", ".join(axes) or "-"
                lines.append(
                    f"  {kind:<20} over {over:<12} x{count:<4} {format_bytes(nbytes)}"
                    f"{where}"
                )
        return "\n".join(lines)


def bytes_per_device(tree: Any) -> int:
    """Bytes each device holds of a tree of arrays or `ShapeDtypeStruct`s with
    shardings (the largest over devices, for uneven layouts)."""
    per_device: dict[Any, int] = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        if not is_arraylike(leaf):
            continue
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            per_device[None] += math.prod(leaf.shape) * itemsize
            continue
        shard = sharding.shard_shape(leaf.shape)
        for device in sharding.device_set:
            per_device[device] += math.prod(shard) * itemsize
    return max(per_device.values(), default=0)


def explain(
    model: Any,
    plan: Plan,
    mesh: Mesh,
    *,
    hlo_text: str | None = None,
    extra_bytes_per_device: dict[str, int] | None = None,
) -> Explanation:
    """Report how `plan` places `model` on `mesh`.

    **Arguments:**

    - `model`: an `eqx.Module` or its `eqx.filter_eval_shape` output.
    - `plan`, `mesh`: the layout.
    - `hlo_text`: optionally, a compiled step's HLO (`compiled.as_text()`), whose
        collectives are listed per kind and mesh axis. `tx.Trainer.explain` fills it in.
    - `extra_bytes_per_device`: optional further rows (gradients, optimizer state).

    **Returns:** an `Explanation`; `print(tx.explain(...))` shows the table.
    """
    shards = shardings(model, plan, mesh)
    logical = logical_axes(model, plan.rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    rows = []
    for (path, leaf), sharding, names in zip(
        leaves,
        treedef.flatten_up_to(shards),
        treedef.flatten_up_to(logical),
        strict=True,
    ):
        if not is_arraylike(leaf):
            continue
        assert isinstance(sharding, NamedSharding)
        shard_shape = tuple(sharding.shard_shape(tuple(leaf.shape)))
        itemsize = np.dtype(leaf.dtype).itemsize
        rows.append(
            ParamRow(
                path=path_str(model, path),
                shape=tuple(leaf.shape),
                dtype=str(np.dtype(leaf.dtype)),
                logical=tuple(names),
                spec=sharding.spec,
                shard_shape=shard_shape,
                bytes_per_device=math.prod(shard_shape) * itemsize,
            )
        )
    return Explanation(
        plan=plan,
        mesh=mesh,
        params=tuple(rows),
        param_bytes_per_device=sum(r.bytes_per_device for r in rows),
        param_bytes_total=sum(
            math.prod(r.shape) * np.dtype(r.dtype).itemsize for r in rows
        ),
        extra_bytes_per_device=dict(extra_bytes_per_device or {}),
        collectives=tuple(collectives(hlo_text, mesh)) if hlo_text else (),
    )
