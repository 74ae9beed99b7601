"""`tx.explain`: a plan, made visible — one row per parameter, bytes per device, and
(given a compiled step) its collectives and XLA's memory analysis."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._axes import is_arraylike, logical_axes, path_str
from ._compat import CompiledMemory, compiled_memory_or_why
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
    - `step_memory`: XLA's memory analysis of a compiled step, when given
        (`compiled.memory_analysis()`: what XLA's buffer assignment allocated), in
        bytes per device: `temp` (the step's temporary buffers: the activations the
        forward pass keeps for the backward pass, and every intermediate and
        scratch buffer; printed as "activations + scratch (compiled temp)"),
        `argument` and `output` (the step's inputs and results: state and batch,
        new state and metrics), `alias` (outputs written over donated arguments),
        `generated_code`, and XLA's `peak` estimate. `None` when no compiled step
        was given, or when its backend has no memory analysis.
    - `step_memory_unavailable`: why a compiled step was given but `step_memory` is
        `None` (the backend's `memory_analysis()` returned `None` or raised);
        otherwise `None`. The report then says "unavailable", never 0.
    """

    plan: Plan
    mesh: Mesh
    params: tuple[ParamRow, ...]
    param_bytes_per_device: int
    param_bytes_total: int
    extra_bytes_per_device: dict[str, int] = dataclasses.field(default_factory=dict)
    collectives: tuple[Collective, ...] = ()
    step_memory: CompiledMemory | None = None
    step_memory_unavailable: str | None = None

    @property
    def activation_bytes_per_device(self) -> int | None:
        """The compiled step's activations and scratch per device: XLA's temporary
        buffers (`memory_analysis().temp_size_in_bytes`), where the activations kept
        for the backward pass live beside every intermediate. `None` when unknown
        (no compiled step, or no memory analysis on its backend)."""
        return None if self.step_memory is None else self.step_memory.temp

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
        memory = self.step_memory
        if memory is not None:
            lines.append(f"{ACTIVATIONS} per device: {format_bytes(memory.temp)}")
        elif self.step_memory_unavailable is not None:
            lines.append(
                f"{ACTIVATIONS} per device: unavailable "
                f"({self.step_memory_unavailable})"
            )
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


# The report's name for `temp_size_in_bytes`: what it holds, and where it comes from.
ACTIVATIONS = "activations + scratch (compiled temp)"


def read_step_memory(
    compiled: Any, mesh: Mesh
) -> tuple[CompiledMemory | None, str | None]:
    """XLA's memory analysis of `compiled` (a `jax.stages.Compiled`), or `None` and
    why there is none: some backends (PjRt plugins) return `None` or raise."""
    memory, why = compiled_memory_or_why(compiled)
    if memory is None:
        return None, f"{why} on the {mesh.devices.flat[0].platform} backend"
    return memory, None


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
    compiled: Any = None,
) -> Explanation:
    """Report how `plan` places `model` on `mesh`.

    **Arguments:**

    - `model`: an `eqx.Module` or its `eqx.filter_eval_shape` output.
    - `plan`, `mesh`: the layout.
    - `hlo_text`: optionally, a compiled step's HLO (`compiled.as_text()`), whose
        collectives are listed per kind and mesh axis.
    - `extra_bytes_per_device`: optional further rows (gradients, optimizer state).
    - `compiled`: optionally, the compiled step (a `jax.stages.Compiled`, e.g.
        `step.lower(state, batch).compile()`). Its memory analysis gives
        `Explanation.step_memory` (printed: its temporary buffers, as "activations
        + scratch (compiled temp)"); its HLO gives the collectives unless
        `hlo_text` is passed. `tx.Trainer.explain` fills it
        in. Only read: nothing runs.

    **Returns:** an `Explanation`; `print(tx.explain(...))` shows the table.

    !!! Example

        ```python
        compiled = step.lower(state, batch).compile()
        report = tx.explain(state.model, plan, mesh, compiled=compiled)
        report.activation_bytes_per_device  # memory_analysis().temp_size_in_bytes
        ```
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
    memory, unavailable = None, None
    if compiled is not None:
        memory, unavailable = read_step_memory(compiled, mesh)
        if hlo_text is None:
            hlo_text = compiled.as_text()
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
        step_memory=memory,
        step_memory_unavailable=unavailable,
    )
