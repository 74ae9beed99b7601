"""`titanax launch`: N local processes of one JAX run, on this machine.

Each process gets `TITANAX_COORDINATOR` (localhost and a free port),
`TITANAX_NUM_PROCESSES` and `TITANAX_PROCESS_ID`, which `tx.distributed.initialize()`
reads; with `devices_per_process`, each also simulates that many CPU devices. Output
is streamed line by line with a `[rank]` prefix. When one process fails, the others
are stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits
non-zero, naming the rank that failed first.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from ._errors import ConfigError

__all__ = ["free_port", "launch", "rank_env"]

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(
    base: Mapping[str, str],
    rank: int,
    num_processes: int,
    port: int,
    devices_per_process: int | None,
) -> dict[str, str]:
    """The environment of process `rank`.

    **Arguments:**

    - `base`: the launcher's environment.
    - `rank`, `num_processes`: this process's id and the count.
    - `port`: the coordinator's port on 127.0.0.1.
    - `devices_per_process`: simulate this many CPU devices per process (and use the
        CPU backend), or `None` to leave devices alone.

    **Returns:** a new environment mapping.
    """
    env = dict(base)
    env.update(
        TITANAX_COORDINATOR=f"127.0.0.1:{port}",
        TITANAX_NUM_PROCESSES=str(num_processes),
        TITANAX_PROCESS_ID=str(rank),
        PYTHONUNBUFFERED="1",
    )
    if devices_per_process is not None:
        flags = re.sub(rf"{_COUNT_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} {_COUNT_FLAG}={devices_per_process}".strip()
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pump(rank: int, pipe: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in pipe:
        with lock:
            out.write(
                f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n"
            )
            out.flush()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every running process group, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int | None = None,
    port: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    grace_s: float = 10.0,
) -> int:
    """Run `command` as `num_processes` processes of one JAX run; wait for them.

    **Arguments:**

    - `command`: the program and its arguments, e.g. `["titanax", "train",
        "run.yaml"]`.
    - `num_processes`: how many processes (>= 1).
    - `devices_per_process`: simulate this many CPU devices in each.
    - `port`: the coordinator port; default a free one.
    - `out`, `err`: where prefixed output and the launcher's messages go (default
        stdout and stderr).
    - `grace_s`: seconds between SIGTERM and SIGKILL when stopping the others.

    **Returns:** 0 when every process exits 0; otherwise the exit code of the first
    process that failed (128 + the signal number if it was killed).

    **Raises:** `ConfigError` for an empty command or a bad count.
    """
    out_stream: TextIO = sys.stdout if out is None else out
    err_stream: TextIO = sys.stderr if err is None else err
    if not command:
        raise ConfigError(
            "Expected a command after `--`, got none.",
            suggestion="Write e.g. `titanax launch -n 2 -- titanax train run.yaml`.",
        )
    for name, value in (
        ("-n", num_processes),
        ("--devices-per-process", devices_per_process),
    ):
        if value is not None and value < 1:
            raise ConfigError(
                f"Expected `{name}` to be >= 1, got {value}.",
                suggestion=f"Pass a positive `{name}`.",
            )
    port = free_port() if port is None else port
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps = []
    try:
        for rank in range(num_processes):
            p = subprocess.Popen(
                list(command),
                env=rank_env(
                    os.environ, rank, num_processes, port, devices_per_process
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,  # its own group: stop it and its children
            )
            procs.append(p)
            assert p.stdout is not None
            t = threading.Thread(target=_pump, args=(rank, p.stdout, out_stream, lock))
            t.daemon = True
            t.start()
            pumps.append(t)
        failed: tuple[int, int] | None = None
        while failed is None:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        with lock:
            err_stream.write("titanax launch: interrupted; stopping every process\n")
        _stop(procs, grace_s)
        return 130
    if failed is not None:
        rank, code = failed
        with lock:
            err_stream.write(
                f"titanax launch: rank {rank} {_describe_exit(code)}; stopping the "
                f"other {num_processes - 1} process(es)\n"
            )
            err_stream.flush()
        _stop(procs, grace_s)
    for t in pumps:
        t.join(timeout=5)
    if failed is None:
        return 0
    code = failed[1]
    return 128 - code if code < 0 else code
