"""Collectives read from compiled HLO text: kind, mesh axes, bytes, inside a loop?"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from jax.sharding import Mesh

__all__ = ["Collective", "collectives", "count_collectives"]

_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "collective-broadcast",
)
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>" + "|".join(_KINDS) + r")(?:-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_CALLEES = re.compile(
    r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bwhile\(.*body=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program.

    **Fields:** `kind` (`all-reduce`, `all-gather`, `reduce-scatter`,
    `collective-permute`, `all-to-all`), `axes` (the mesh axes its device groups span),
    `bytes` (of its result, per device), `in_loop` (inside a `while` body, so it runs
    once per iteration), `computation` (the HLO computation holding it).
    """

    kind: str
    axes: tuple[str, ...]
    bytes: int
    in_loop: bool
    computation: str


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def _groups(line: str) -> list[list[int]] | None:
    match = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if match:
        return [
            [int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,]*)\}", match.group(1))
        ]
    match = re.search(
        r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line
    )
    if match:
        out_shape = [int(x) for x in match.group(1).split(",")]
        iota_shape = [int(x) for x in match.group(2).split(",")]
        ids = np.arange(int(np.prod(iota_shape))).reshape(iota_shape)
        if match.group(3):
            ids = ids.transpose([int(x) for x in match.group(3).split(",")])
        return ids.reshape(out_shape).tolist()
    match = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?)?"
        r"\s*\{([^}]*)\}",
        line,
    )
    if match:
        return _mesh_groups(*match.groups())
    match = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)
    if match:
        pairs = re.findall(r"\{(\d+),(\d+)\}", line)
        return [[int(a), int(b)] for a, b in pairs]
    return None


def _mesh_groups(
    axes: str, iota: str | None, transpose: str | None, reduced: str
) -> list[list[int]]:
    """Device groups of the `mesh['a'=2,'b'=4] {'a'}` replica-group form."""
    names = re.findall(r"'([^']+)'=(\d+)", axes)
    sizes = [int(s) for _, s in names]
    if iota:
        ids = np.arange(int(np.prod(sizes))).reshape([int(x) for x in iota.split(",")])
        if transpose:
            ids = ids.transpose([int(x) for x in transpose.split(",")])
        ids = ids.reshape(sizes)
    else:
        ids = np.arange(int(np.prod(sizes))).reshape(sizes)
    over = [i for i, (n, _) in enumerate(names) if f"'{n}'" in reduced]
    keep = [i for i in range(len(names)) if i not in over]
    size = int(np.prod([sizes[i] for i in over])) if over else 1
    return ids.transpose(keep + over).reshape(-1, size).tolist()


def _axes_of(groups: list[list[int]] | None, mesh: Mesh | None) -> tuple[str, ...]:
    if not groups or mesh is None:
        return ()
    shape = tuple(mesh.devices.shape)
    varying: set[int] = set()
    for group in groups:
        coords = np.array([np.unravel_index(i, shape) for i in group])
        varying |= {d for d in range(len(shape)) if len(set(coords[:, d])) > 1}
    return tuple(mesh.axis_names[d] for d in sorted(varying))


def _loop_computations(lines: Iterable[tuple[str, str]]) -> set[str]:
    """Computations that run inside a `while` body (transitively)."""
    callees: dict[str, set[str]] = defaultdict(set)
    bodies: set[str] = set()
    for computation, line in lines:
        callees[computation] |= set(_CALLEES.findall(line))
        for branch in _BRANCHES.findall(line):
            callees[computation] |= {b.strip().lstrip("%") for b in branch.split(",")}
        bodies |= set(_WHILE_BODY.findall(line))
    inside, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name not in inside:
            inside.add(name)
            todo.extend(callees.get(name, ()))
    return inside


def collectives(hlo_text: str, mesh: Mesh | None = None) -> list[Collective]:
    """Every collective in compiled HLO text (`compiled.as_text()`).

    **Arguments:**

    - `hlo_text`: the text of a compiled (SPMD-partitioned) program.
    - `mesh`: the mesh it was compiled for, to name each op's axes.

    **Returns:** a list of `Collective`, in program order. Async pairs
    (`all-reduce-start`/`-done`) count once.
    """
    lines: list[tuple[str, str]] = []
    computation = ""
    for raw in hlo_text.splitlines():
        line = raw.strip()
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        lines.append((computation, line))
    in_loop = _loop_computations(lines)
    found = []
    for computation, line in lines:
        match = _OP.search(line)
        if not match:
            continue
        shape = match.group("shape")
        if match.group(0).rstrip("(").endswith("-start") and shape.startswith("("):
            # An async start returns (operands, results[, context]); count results.
            parts = _SHAPE.findall(shape)
            shape = " ".join(f"{d}[{s}]" for d, s in parts[len(parts) // 2 :])
        found.append(
            Collective(
                kind=match.group("kind"),
                axes=_axes_of(_groups(line), mesh),
                bytes=_shape_bytes(shape),
                in_loop=computation in in_loop,
                computation=computation,
            )
        )
    return found


def count_collectives(
    hlo_text: str,
    mesh: Mesh | None = None,
    kind: str | None = None,
    axes: tuple[str, ...] | None = None,
) -> int:
    """How many collectives of `kind` over exactly `axes` the HLO holds."""
    return sum(
        1
        for c in collectives(hlo_text, mesh)
        if (kind is None or c.kind == kind) and (axes is None or c.axes == axes)
    )
