"""Many hosts, for real: 2 processes x 4 CPU devices train like 1 process x 8.

The test starts the processes itself (`tests/_dp_worker.py`), over
`jax.distributed` on localhost with gloo CPU collectives; each process feeds only its
own rows of every global batch. Every wait has a timeout, stragglers are killed, and
a process that dies fails the test with its exit code and stderr.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _dp_worker as worker
import numpy as np
import pytest

WORKER = Path(__file__).with_name("_dp_worker.py")
TIMEOUT_S = 120


class WorkerFailure(Exception):
    """A worker process died, or the run timed out."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(
    num_processes: int = 2, extra: dict[int, list[str]] | None = None
) -> list[dict]:
    """Run the workers; their JSON results, or `WorkerFailure` (never hangs)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env.update(JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    port = _free_port()
    # Files, not pipes: a full pipe would block a worker, and so the run.
    logs = [
        (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
        for _ in range(num_processes)
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(num_processes), str(i)]
            + (extra or {}).get(i, []),
            env=env,
            stdout=logs[i][0],
            stderr=logs[i][1],
            text=True,
        )
        for i in range(num_processes)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            codes = [p.poll() for p in procs]
            failure = "; ".join(
                f"worker process {i} died with exit code {code}"
                for i, code in enumerate(codes)
                if code not in (None, 0)
            )
            if failure or all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                failure = f"the workers did not finish within {TIMEOUT_S} s"
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # stragglers: the peers of a dead process wait forever
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
        outputs = []
        for out, err in logs:
            out.seek(0)
            err.seek(0)
            outputs.append((out.read(), err.read()))
            out.close()
            err.close()
    if failure:
        stderr = "\n".join(
            f"--- process {i} stderr (tail):\n{err[-2000:]}"
            for i, (_, err) in enumerate(outputs)
        )
        raise WorkerFailure(f"{failure}.\n{stderr}")
    results = []
    for i, (out, err) in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise WorkerFailure(f"worker {i} printed no result.\n{err[-2000:]}")
        results.append(json.loads(lines[-1]))
    return results


def test_two_processes_match_one_process_of_eight_devices():
    # The reference: this process, 8 devices, the whole global batch.
    ref_losses, ref_param_sum = worker.train(worker.batches())
    assert len(ref_losses) == worker.STEPS
    try:
        results = _run_workers()
    except WorkerFailure as e:
        pytest.fail(str(e))
    for result in results:
        np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-6)
        np.testing.assert_allclose(result["param_sum"], ref_param_sum, rtol=1e-6)


def test_dead_peer_fails_with_a_clear_message():
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="worker process 1 died with exit code 3"):
        _run_workers(extra={1: ["--die"]})
    assert time.monotonic() - start < TIMEOUT_S
