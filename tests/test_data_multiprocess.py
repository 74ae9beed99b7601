"""`titanax.data` across 2 real processes x 4 CPU devices (`jax.distributed` on
localhost, gloo collectives; `tests/_data_worker.py`).

Each process reads only its rows of every global batch; the global arrays built
from them with `jax.make_array_from_process_local_data` equal the 1-process global
batch, step by step, under DP=8 and DP=2 x TP=4; a DP=8 stream saved after two
batches and resumed under DP=2 x TP=4 continues with the same global batch. Every
wait has a timeout; a process that dies fails the test with its stderr.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _data_worker as worker
import numpy as np
import pytest

WORKER = Path(__file__).with_name("_data_worker.py")
TIMEOUT_S = 120
PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers() -> list[dict]:
    """The workers' JSON results; `pytest.fail` with their stderr if one dies."""
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
        for _ in range(PROCESSES)
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(PROCESSES), str(i)],
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )
        for i, (out, err) in enumerate(logs)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    failure = ""
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
        for p in procs:  # the peers of a dead process wait forever
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
        tails = "\n".join(
            f"--- process {i} stderr (tail):\n{err[-2000:]}"
            for i, (_, err) in enumerate(outputs)
        )
        pytest.fail(f"{failure}.\n{tails}")
    results = []
    for i, (out, err) in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            pytest.fail(f"worker {i} printed no result.\n{err[-2000:]}")
        results.append(json.loads(lines[-1]))
    return results


def test_two_processes_read_their_rows_of_the_one_process_global_batch():
    pipeline = worker.make_pipeline()
    batch = worker.GLOBAL_BATCH
    want = [pipeline.global_batch(step * batch) for step in range(worker.STEPS)]
    results = sorted(_run_workers(), key=lambda r: r["process"])

    for name in ("dp8", "dp2_tp4"):
        rows = [r["layouts"][name]["rows"] for r in results]
        # Process 0 owns devices 0-3: data shards 0-3 of 8, or shard 0 of 2.
        assert rows == [list(range(8)), list(range(8, 16))], name
        for result, mine in zip(results, rows, strict=True):
            layout = result["layouts"][name]
            for step in range(worker.STEPS):
                assert layout["local_ids"][step] == want[step]["id"][mine].tolist()
                for key in ("id", "v"):
                    np.testing.assert_array_equal(
                        layout["global"][step][key],
                        want[step][key],
                        err_msg=f"{name} step {step} {key} process {result['process']}",
                    )

    resumed_at = worker.SAVED_STEPS * batch
    following = pipeline.global_batch(resumed_at)
    for result in results:
        resumed = result["resumed"]
        assert resumed["position"] == resumed_at
        for key in ("id", "v"):
            np.testing.assert_array_equal(resumed["global"][key], following[key])
