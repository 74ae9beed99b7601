"""The `titanax` command line.

```
titanax train CONFIG [key=value ...] [--devices N]
                                         train from a YAML config (alias: run)
titanax explain CONFIG [key=value ...] [--devices N] [--device-memory 80GB]
                                         compile the step ahead of time; memory,
                                         FLOPs, collectives; no training
titanax launch -n N [--devices-per-process K] -- COMMAND ...
                                         N local processes of one JAX run
titanax info                             versions, devices, processes, cluster
titanax checkpoint ls PATH               steps, time, size, mesh, plan
titanax checkpoint show PATH [--step N]  leaf paths, shapes, dtypes, shardings
```

The checkpoint commands read the JSON metadata Titanax writes beside each step;
neither loads arrays.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._errors import CheckpointError, TitanaxError

__all__ = ["main"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _mesh_text(mesh: Any) -> str:
    if not isinstance(mesh, dict) or not mesh.get("shape"):
        return "-"
    return " x ".join(f"{name}={size}" for name, size in mesh["shape"].items())


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _ls(path: str, out: TextIO) -> int:
    from .checkpoint._metadata import dir_size, read_metadata, scan

    steps, unfinished = scan(path)
    root = Path(path)
    print(f"Checkpoints in {root.absolute()}: {len(steps)} step(s)", file=out)
    if steps:
        rows = [["step", "time (UTC)", "size", "data pos", "mesh", "plan"]]
        for step in steps:
            size = _size(dir_size(root / str(step)))
            try:
                meta = read_metadata(root, step)
            except CheckpointError as e:
                rows.append([str(step), "-", size, "-", "-", f"DAMAGED: {e.message}"])
                continue
            rows.append(
                [
                    str(step),
                    str(meta.get("time_utc", "-")),
                    size,
                    str(meta.get("data_position", "-")),
                    _mesh_text(meta.get("mesh")),
                    str(meta.get("plan") or "-"),
                ]
            )
        _table(rows, out)
    for name in unfinished:
        print(f"unfinished save (ignored, never restored): {name}", file=out)
    return 0


def _show(path: str, step: int | None, out: TextIO) -> int:
    from .checkpoint._metadata import dir_size, format_spec, read_metadata, scan

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
    leaves = [x for x in meta.get("leaves") or [] if isinstance(x, dict)]
    total = sum(int(x.get("bytes", 0)) for x in leaves)
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
        ("size", f"{_size(dir_size(root / str(step)))} on disk"),
        ("format", str(meta.get("format", "-"))),
        ("data position", str(meta.get("data_position", "-"))),
        ("mesh", mesh_line),
        ("plan", str(meta.get("plan") or "-")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"),
    ]
    if meta.get("config") is not None:
        header.append(("config", json.dumps(meta["config"], sort_keys=True)))
    print(f"Checkpoint {root}", file=out)
    for name, value in header:
        print(f"  {name + ':':<15}{value}", file=out)
    print(f"\n{len(leaves)} array(s), {_size(total)}:", file=out)
    rows = [["path", "shape", "dtype", "sharding", "size"]]
    for leaf in leaves:
        rows.append(
            [
                str(leaf.get("path", "?")),
                str(tuple(leaf.get("shape", ()))),
                str(leaf.get("dtype", "?")),
                format_spec(leaf.get("spec")),
                _size(int(leaf.get("bytes", 0))),
            ]
        )
    _table(rows, out)
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML run config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. steps=20 optimizer.lr=3e-4",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="simulate N CPU devices (before JAX starts)",
    )


# The subparsers of `train`, `run` and `explain`, filled by `_parser`.
_CONFIG_COMMANDS: dict[str, argparse.ArgumentParser] = {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titanax", description="Titanax command line tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "run"):
        train = commands.add_parser(
            name,
            help="train from a YAML config"
            + (" (alias of train)" if name == "run" else ""),
        )
        _add_config_args(train)
        _CONFIG_COMMANDS[name] = train
    explain = commands.add_parser(
        "explain",
        help="compile the step ahead of time: memory, FLOPs, collectives; no training",
    )
    _add_config_args(explain)
    _CONFIG_COMMANDS["explain"] = explain
    explain.add_argument(
        "--device-memory",
        default=None,
        metavar="SIZE",
        help="say whether the step fits this much memory per device, e.g. 80GB",
    )
    explain.add_argument(
        "--json", action="store_true", help="print the numbers as JSON instead"
    )
    launch = commands.add_parser(
        "launch", help="run COMMAND as N local processes of one JAX run"
    )
    launch.add_argument("-n", "--num-processes", type=int, required=True)
    launch.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        metavar="K",
        help="simulate K CPU devices in each process",
    )
    launch.add_argument("--port", type=int, default=None, help="coordinator port")
    launch.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    commands.add_parser("info", help="versions, devices, processes, cluster")
    checkpoint = commands.add_parser(
        "checkpoint", help="inspect checkpoints written by tx.OrbaxCheckpoint"
    )
    actions = checkpoint.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("ls", help="list steps: time, size, mesh, plan")
    ls.add_argument("path", help="the checkpoint directory")
    show = actions.add_parser(
        "show", help="one step's leaves: paths, shapes, dtypes, shardings"
    )
    show.add_argument("path", help="the checkpoint directory")
    show.add_argument("--step", type=int, default=None, help="default: the latest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `titanax` command line; returns the exit status.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`), e.g.
        `["checkpoint", "ls", "/tmp/run"]`.

    **Returns:** 0 on success, 1 on a Titanax error (printed to stderr), 2 on a
    usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] in _CONFIG_COMMANDS:
        # Options may come after the `key=value` overrides.
        args = _CONFIG_COMMANDS[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    out = sys.stdout
    try:
        if args.command == "checkpoint":
            if args.action == "ls":
                return _ls(args.path, out)
            return _show(args.path, args.step, out)
        return _run_command(args, out)
    except TitanaxError as e:
        print(f"titanax: error: {e}", file=sys.stderr)
        return 1


def _run_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "launch":
        from ._launch import launch

        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        return launch(
            cmd,
            args.num_processes,
            devices_per_process=args.devices_per_process,
            port=args.port,
            out=out,
        )
    if args.command == "info":
        from ._jobs import info_text

        print(info_text(), file=out)
        return 0
    if args.devices is not None:
        from ._mesh import simulate_cpu_devices

        simulate_cpu_devices(args.devices)
    from . import _jobs
    from .config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "explain":
        memory = None
        if args.device_memory is not None:
            memory = _jobs.parse_bytes(args.device_memory)
        text, report = _jobs.explain_config(config, device_memory=memory)
        print(json.dumps(report, indent=2) if args.json else text, file=out)
        return 0
    _jobs.train_config(config, stream=out)
    return 0
