"""`titanax checkpoint ls|show|verify`: inspect checkpoints from the command line.

```
titanax checkpoint ls PATH [--verify]     steps: time, size, data position, mesh,
                                          plan; damaged steps marked
titanax checkpoint show PATH [--step N]   one step's arrays: path, shape, dtype,
                                          sharding, size
titanax checkpoint verify PATH [--step N] read every array, compare fingerprints
```

`ls` and `show` read only the JSON metadata and the files' layout; `verify` (and
`ls --verify`) read the arrays. Every string that comes from a checkpoint is
printed with control characters escaped: a crafted metadata file cannot send
escape sequences to the terminal.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from pathlib import Path
from typing import Any, TextIO

from .._errors import CheckpointError
from .._units import format_bytes

__all__ = ["ls", "register", "run", "show", "verify"]


def printable(value: Any, newlines: bool = False) -> str:
    """`str(value)` with control and format characters escaped (`\\x1b`).

    **Arguments:**

    - `value`: anything; its `str` is escaped.
    - `newlines`: keep `\\n` as is (for multi-line messages).
    """
    out = []
    for char in str(value):
        if newlines and char == "\n":
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _mesh_text(mesh: Any) -> str:
    if not isinstance(mesh, dict) or not mesh.get("shape"):
        return "-"
    return " x ".join(f"{name}={size}" for name, size in mesh["shape"].items())


def _table(rows: list[list[str]], out: TextIO) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _damage(root: Path, step: int) -> tuple[dict[str, Any] | None, str | None]:
    """A step's metadata and, if it is damaged (metadata or files), why."""
    from ._damage import from_problem
    from ._layout import check_files
    from ._metadata import read_metadata

    try:
        meta = read_metadata(root, step)
    except CheckpointError as e:
        return None, e.message
    paths = {".".join(x["key"]): x["path"] for x in meta["leaves"]}
    problem = check_files(root / str(step))
    if problem is not None:
        return meta, from_problem(step, problem, paths).message
    return meta, None


def ls(path: str, out: TextIO, *, check_data: bool = False) -> int:
    """Print the steps under `path`, damaged ones marked; returns 0.

    **Arguments:**

    - `path`: the checkpoint directory.
    - `out`: where to print.
    - `check_data`: also read every array and compare fingerprints (`--verify`).
    """
    from ._metadata import dir_size, scan

    steps, unfinished = scan(path)
    root = Path(path).absolute()
    print(f"Checkpoints in {printable(root)}: {len(steps)} step(s)", file=out)
    damaged = {}
    if check_data and steps:
        damaged = {
            step: error.message
            for step, error in _open(root).verify().items()
            if error is not None
        }
    if steps:
        rows = [["step", "time (UTC)", "size", "data pos", "mesh", "plan"]]
        for step in steps:
            size = format_bytes(dir_size(root / str(step)))
            meta, problem = _damage(root, step)
            problem = problem or damaged.get(step)
            if meta is None:
                rows.append([str(step), "-", size, "-", "-", f"DAMAGED: {problem}"])
                continue
            plan = str(meta.get("plan") or "-")
            rows.append(
                [
                    str(step),
                    str(meta.get("time_utc", "-")),
                    size,
                    str(meta.get("data_position", "-")),
                    _mesh_text(meta.get("mesh")),
                    f"DAMAGED: {problem}" if problem else plan,
                ]
            )
        _table(rows, out)
    for name in unfinished:
        print(f"unfinished save (ignored, never restored): {printable(name)}", file=out)
    return 0


def show(path: str, step: int | None, out: TextIO) -> int:
    """Print one step's header and a row per array; returns 0.

    **Raises:** `CheckpointError` if there is no such step or its metadata is
    damaged.
    """
    from ._metadata import dir_size, format_spec, read_metadata, scan

    steps, _ = scan(path)
    if not steps:
        raise CheckpointError(
            f"Expected a checkpoint in `{path}`, found no finished step.",
            suggestion="Check the path (`titanax checkpoint ls PATH`).",
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(
            f"Expected step {step} in `{path}`; the finished steps are {steps}.",
            suggestion="Pass one of those with `--step`, or omit it for the latest.",
        )
    meta = read_metadata(path, step)
    root = Path(path).absolute()
    leaves = meta["leaves"]
    total = sum(x["bytes"] for x in leaves)
    mesh = meta.get("mesh")
    mesh_line = _mesh_text(mesh)
    if isinstance(mesh, dict) and mesh.get("devices"):
        mesh_line += (
            f" ({mesh['devices']} {mesh.get('platform') or ''} device(s), "
            f"{mesh.get('processes', 1)} process(es))"
        )
    versions = meta.get("versions") or {}
    header = [
        ("step", f"{step} of {steps}"),
        ("time", str(meta.get("time_utc", "-"))),
        ("size", f"{format_bytes(dir_size(root / str(step)))} on disk"),
        ("format", str(meta["format"])),
        ("data position", f"{meta.get('data_position', '-')} samples"),
        ("mesh", mesh_line),
        ("plan", str(meta.get("plan") or "-")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"),
    ]
    if meta.get("config") is not None:
        header.append(("config", json.dumps(meta["config"], sort_keys=True)))
    print(f"Checkpoint {printable(root)}", file=out)
    for name, value in header:
        print(f"  {name + ':':<15}{printable(value)}", file=out)
    print(f"\n{len(leaves)} array(s), {format_bytes(total)}:", file=out)
    rows = [["path", "shape", "dtype", "sharding", "size"]]
    for leaf in leaves:
        rows.append(
            [
                str(leaf["path"]),
                str(tuple(leaf["shape"])),
                str(leaf["dtype"]),
                format_spec(leaf.get("spec")),
                format_bytes(leaf["bytes"]),
            ]
        )
    _table(rows, out)
    return 0


def _open(root: Path) -> Any:
    from ._orbax import OrbaxCheckpoint

    return OrbaxCheckpoint(root, read_only=True)


def verify(path: str, step: int | None, out: TextIO) -> int:
    """Read and check every array of one step (or all); returns 0 if all intact,
    1 if any step is damaged."""
    root = Path(path).absolute()
    ckpt = _open(root)
    report = ckpt.verify(step)
    if not report:
        print(f"Checkpoints in {printable(root)}: no finished step.", file=out)
        return 1
    for checked, error in report.items():
        if error is None:
            print(f"step {checked}: OK", file=out)
        else:
            print(f"step {checked}: DAMAGED: {printable(error.message)}", file=out)
    bad = sum(error is not None for error in report.values())
    print(f"{len(report) - bad} intact, {bad} damaged.", file=out)
    return 1 if bad else 0


def register(commands: Any) -> None:
    """Add the `checkpoint` command and its actions to an argparse subparsers."""
    checkpoint = commands.add_parser(
        "checkpoint", help="inspect checkpoints written by tx.OrbaxCheckpoint"
    )
    actions = checkpoint.add_subparsers(dest="action", required=True)
    cmd = actions.add_parser("ls", help="list steps: time, size, mesh, plan, damage")
    cmd.add_argument("path", help="the checkpoint directory")
    cmd.add_argument(
        "--verify", action="store_true", help="also read and check every array"
    )
    cmd = actions.add_parser(
        "show", help="one step's arrays: paths, shapes, dtypes, shardings"
    )
    cmd.add_argument("path", help="the checkpoint directory")
    cmd.add_argument("--step", type=int, default=None, help="default: the latest")
    cmd = actions.add_parser(
        "verify", help="read every array and compare it with its fingerprint"
    )
    cmd.add_argument("path", help="the checkpoint directory")
    cmd.add_argument("--step", type=int, default=None, help="default: every step")


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run a parsed `checkpoint` command; returns the exit status."""
    if args.action == "ls":
        return ls(args.path, out, check_data=args.verify)
    if args.action == "show":
        return show(args.path, args.step, out)
    return verify(args.path, args.step, out)
