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
titanax checkpoint ls PATH [--verify]    steps, time, size, mesh, plan, damage
titanax checkpoint show PATH [--step N]  leaf paths, shapes, dtypes, shardings
titanax checkpoint verify PATH [--step N]
                                         read every array, check fingerprints
```

The checkpoint commands live with checkpoints (`titanax/checkpoint/_commands.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from ._errors import TitanaxError

__all__ = ["main"]


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
    from .checkpoint._commands import register

    register(commands)
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
            from .checkpoint._commands import run

            return run(args, out)
        return _run_command(args, out)
    except TitanaxError as e:
        from .checkpoint._commands import printable

        print(f"titanax: error: {printable(e, newlines=True)}", file=sys.stderr)
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
