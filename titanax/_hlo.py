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


def _groups(line: str, n_devices: int | None) -> list[list[int]] | None:
    """The device groups of a collective line, as positions in the device assignment.

    Handles the explicit `{{0,1},{2,3}}`, iota `[2,4]<=[8]T(..)` and mesh
    `mesh['a'=2,'b'=4], device_ids=(..) {'a'}` replica-group forms, an empty
    `replica_groups={}` (all devices) and collective-permute `source_target_pairs`.
    """
    match = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if match:
        return [
            [int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,]*)\}", match.group(1))
        ]
    if "replica_groups={}" in line:
        return [list(range(n_devices))] if n_devices else None
    match = re.search(
        r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line
    )
    if match:
        out_shape = [int(x) for x in match.group(1).split(",")]
        return _iota(match.group(2), match.group(3)).reshape(out_shape).tolist()
    match = re.search(
        r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
        r"(?:,\s*device_ids=\((?P<ids>.*?)\))?"
        r"(?:<=\[(?P<iota>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?)?"
        r"\s*\{(?P<over>[^}]*)\}",
        line,
    )
    if match:
        return _mesh_groups(**match.groupdict())
    # Match the pairs inside the attribute only: a layout such as `{1,0}` elsewhere
    # on the line looks like a pair too.
    match = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if match:
        pairs = re.findall(r"\{(\d+),(\d+)\}", match.group(1))
        return [[int(a), int(b)] for a, b in pairs]
    return None


def _iota(reshape: str, perm: str | None) -> np.ndarray:
    """The device ids of an iota tile assignment `[reshape]T(perm)`, flattened."""
    dims = [int(x) for x in reshape.split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if perm:
        ids = ids.transpose([int(x) for x in perm.split(",")])
    return ids.reshape(-1)


def _mesh_groups(
    axes: str, ids: str | None, iota: str | None, perm: str | None, over: str
) -> list[list[int]]:
    """Device groups of the `mesh['a'=2,'b'=4], device_ids=(..) {'a'}` form.

    The mesh is XLA's own (its axis names need not be the user's); the groups vary
    over the axes (or sub-axes `'a':(pre)size`) in braces.
    """
    names = [
        (n.strip("'"), int(s)) for n, s in re.findall(r"('[^']*'|[^=,]+)=(\d+)", axes)
    ]
    sizes = [s for _, s in names]
    count = int(np.prod(sizes))
    if ids:
        iota_ids = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", ids.strip())
        if iota_ids:
            devices = _iota(*iota_ids.groups())
        else:
            devices = np.array([int(x) for x in re.findall(r"\d+", ids)])
    elif iota:
        devices = _iota(iota, perm)
    else:
        devices = np.arange(count)
    # Split each mesh axis into (pre, size, rest) pieces for the sub-axes named.
    refs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    axis_index = {name: i for i, (name, _) in enumerate(names)}
    for name, pre, size in re.findall(r"('[^']*'|[^,:\s]+)(?::\((\d+)\)(\d+))?", over):
        i = axis_index[name.strip("'")]
        refs[i].append((int(pre), int(size)) if pre else (1, sizes[i]))
    dims: list[int] = []
    grouped: list[int] = []
    for i, full in enumerate(sizes):
        done = 1
        for pre, size in sorted(refs.get(i, [])):
            if pre != done:
                dims.append(pre // done)
            grouped.append(len(dims))
            dims.append(size)
            done = pre * size
        if done != full or not refs.get(i):
            dims.append(full // done)
    kept = [d for d in range(len(dims)) if d not in grouped]
    per_group = int(np.prod([dims[d] for d in grouped])) if grouped else 1
    return (
        devices.reshape(dims).transpose(kept + grouped).reshape(-1, per_group).tolist()
    )


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
    n_devices = mesh.devices.size if mesh is not None else None
    found = []
    for computation, line in lines:
        match = _OP.search(line)
        if not match:
            continue
        shape = match.group("shape")
        is_start = match.group(0).rstrip("(").endswith("-start")
        if is_start and match.group("kind") != "all-reduce" and shape.startswith("("):
            # `all-gather-start` and `collective-permute-start` return (operands,
            # results[, u32[] contexts]); count the results. `all-reduce-start`
            # returns its results only (a tuple when combined), so it is kept whole.
            parts = [(d, s) for d, s in _SHAPE.findall(shape) if s]
            shape = " ".join(f"{d}[{s}]" for d, s in parts[len(parts) // 2 :])
        found.append(
            Collective(
                kind=match.group("kind"),
                axes=_axes_of(_groups(line, n_devices), mesh),
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
