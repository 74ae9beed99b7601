"""`tx.distributed.initialize()`: join a multi-process run from the environment.

Detects, in order: Titanax's own variables (`TITANAX_COORDINATOR`,
`TITANAX_NUM_PROCESSES`, `TITANAX_PROCESS_ID`, set by `titanax launch`), SLURM
(`SLURM_JOB_ID` with `SLURM_NTASKS` > 1) and Open MPI (`OMPI_COMM_WORLD_SIZE` > 1),
and calls `jax.distributed.initialize` with a heartbeat timeout, so that when a
process dies its peers stop too instead of waiting in a collective.

A SLURM job (one task per host, all GPUs of the host per task):

```bash
#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8
srun titanax train run.yaml
```

Each task calls `tx.distributed.initialize()` (`titanax train` does): JAX reads
the coordinator (the first node), the process count and id from SLURM.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax

from ._compat import distributed_initialize
from ._errors import ConfigError

__all__ = ["Cluster", "detect", "initialize"]

# A peer silent this long is declared dead and every process stops. JAX's default
# is 100 s. Measured with jax 0.10.2 on CPU (2 processes x 4 devices training, one
# killed with SIGKILL): the survivor exited 26.6 s later, naming the dead task
# (tests/test_launch.py checks < 60 s).
HEARTBEAT_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A detected multi-process environment.

    **Fields:** `kind` (`"titanax"`, `"slurm"`, `"openmpi"` or `"single"`),
    `num_processes`, `process_id`, `coordinator` (`host:port`, or `None` when JAX
    finds it itself).
    """

    kind: str
    num_processes: int
    process_id: int
    coordinator: str | None = None

    def describe(self) -> str:
        """`slurm: process 0 of 2 (coordinator node1:1234)`."""
        text = f"{self.kind}: process {self.process_id} of {self.num_processes}"
        return text + (f" (coordinator {self.coordinator})" if self.coordinator else "")


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"Expected the environment variable `{name}` to be an integer, got "
            f"{value!r}.",
            path=name,
            suggestion=f"Set {name} to an integer, or unset it.",
        ) from None


def detect(env: Mapping[str, str] | None = None) -> Cluster:
    """The multi-process environment this process runs in.

    **Arguments:**

    - `env`: the environment; default `os.environ`.

    **Returns:** a `Cluster` (`kind="single"` outside any of them).

    **Raises:** `ConfigError` for half-set or malformed `TITANAX_*` variables.
    """
    env = os.environ if env is None else env
    names = ("TITANAX_COORDINATOR", "TITANAX_NUM_PROCESSES", "TITANAX_PROCESS_ID")
    present = [n for n in names if n in env]
    if present:
        if len(present) != len(names):
            missing = [n for n in names if n not in env]
            raise ConfigError(
                f"Expected all of {', '.join(names)} to be set, got only "
                f"{', '.join(present)}.",
                path=missing[0],
                suggestion=f"Set {', '.join(missing)} too (or use `titanax launch`).",
            )
        n, i = _int(env, names[1]), _int(env, names[2])
        if not 0 <= i < n:
            raise ConfigError(
                f"Expected TITANAX_PROCESS_ID in [0, {n}), got {i}.",
                path="TITANAX_PROCESS_ID",
                suggestion="Number the processes 0 .. TITANAX_NUM_PROCESSES - 1.",
            )
        return Cluster("titanax", n, i, env[names[0]])
    if "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS") > 1:
        return Cluster("slurm", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"))
    if _int({"X": env.get("OMPI_COMM_WORLD_SIZE", "1")}, "X") > 1:
        return Cluster(
            "openmpi",
            _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_RANK"),
        )
    return Cluster("single", 1, 0)


def initialize(
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Cluster:
    """Join the multi-process run this process belongs to, if any.

    Call it first, before any other JAX call. In a single process it does nothing.

    **Arguments:**

    - `heartbeat_timeout_s`: a process silent this long is declared dead and the
        others stop (JAX's default is 100 s).
    - `env`: the environment to read; default `os.environ`.
    - `**kwargs`: passed to `jax.distributed.initialize` (e.g.
        `initialization_timeout`, `local_device_ids`).

    **Returns:** the detected `Cluster`.

    **Raises:** `ConfigError` for malformed `TITANAX_*` variables.

    !!! Example

        ```python
        import titanax as tx
        cluster = tx.distributed.initialize()  # SLURM, Open MPI, titanax launch
        print(cluster.describe(), jax.device_count())
        ```
    """
    cluster = detect(env)
    if cluster.kind == "single":
        return cluster
    if jax.distributed.is_initialized():
        return cluster
    if cluster.kind == "titanax":
        distributed_initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            heartbeat_timeout_s=heartbeat_timeout_s,
            **kwargs,
        )
    else:
        # JAX's own cluster detection reads the coordinator from SLURM / Open MPI.
        method = {"slurm": "slurm", "openmpi": "ompi"}[cluster.kind]
        distributed_initialize(
            cluster_detection_method=method,
            heartbeat_timeout_s=heartbeat_timeout_s,
            **kwargs,
        )
    return cluster
