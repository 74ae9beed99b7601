"""Many hosts: 2 processes x 4 CPU devices save, agree on preemption, and their
checkpoint restores elsewhere.

The test starts `_ckpt_worker.py` twice over `jax.distributed` on localhost (gloo
collectives), sends SIGTERM to process 1 only, and checks that both stop at the
same step, save it, and exit with 75 (preempted): once with a hand-written loop
(`make_train_step`, `PreemptionGuard.should_stop`), once through `Trainer.fit`.
Then, in this process (8 devices): the checkpoint restores onto 1 process x 8
devices and onto 1 device, bitwise equal to what the workers saved, and a run
resumed here continues at the same global sample and matches an uninterrupted run.
Every wait has a timeout; a process that dies fails the test with its exit code
and stderr.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _ckpt_worker as worker
import jax
import numpy as np
import pytest

import titanax as tx
from titanax.checkpoint import OrbaxCheckpoint
from titanax.checkpoint._metadata import scan
from titanax.train import abstract_state

WORKER = Path(__file__).with_name("_ckpt_worker.py")
TIMEOUT_S = 180
SIGTERM_AFTER = 8  # process 1 gets SIGTERM once it printed this step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["loop", "trainer"])
def preempted(request, tmp_path_factory):
    """Run the two workers, SIGTERM process 1 after step 8; (results, directory)."""
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    extra = ["--trainer"] if request.param == "trainer" else []
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env.update(JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    port = _free_port()
    errs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), "2", str(i), "--dir", str(path)]
            + extra,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errs[i],
            text=True,
        )
        for i in range(2)
    ]
    watchdogs = [threading.Timer(TIMEOUT_S, p.kill) for p in procs]  # never hang
    for w in watchdogs:
        w.start()
    outs = ["", ""]

    def read(i):
        stream = procs[i].stdout
        assert stream is not None
        for line in stream:
            outs[i] += line
            if i == 1 and line.strip() == f"step {SIGTERM_AFTER}":
                procs[1].send_signal(signal.SIGTERM)  # the other process is not told

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
    for r in readers:
        r.join(timeout=10)
    for w in watchdogs:
        w.cancel()
    stderr = []
    for err in errs:
        err.seek(0)
        stderr.append(err.read()[-3000:])
        err.close()
    codes = [p.returncode for p in procs]
    results = []
    for i, out in enumerate(outs):
        lines = [x for x in out.splitlines() if x.startswith("{")]
        assert lines, f"process {i} exited {codes[i]} without a result:\n{stderr[i]}"
        results.append(json.loads(lines[-1]))
    return codes, results, path, stderr


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(preempted):
    codes, results, path, stderr = preempted
    assert codes == [worker.PREEMPTED] * 2, stderr
    stops = [r["stopped"] for r in results]
    print(f"\nSIGTERM after step {SIGTERM_AFTER}; both stopped at {stops[0]}")
    assert stops[0] == stops[1] > SIGTERM_AFTER
    assert all(r["preempted"] for r in results)
    stop = stops[0]
    steps, unfinished = scan(path)
    assert steps[-1] == stop and unfinished == []
    meta = OrbaxCheckpoint(path, read_only=True).metadata(stop)
    assert meta["data_position"] == stop * worker.GLOBAL_BATCH
    assert meta["mesh"]["processes"] == 2 and meta["mesh"]["devices"] == 8


@pytest.mark.parametrize("devices", [8, 1], ids=["1x8", "1x1"])
def test_two_process_checkpoint_restores_on_one_process(devices, preempted):
    _, results, path, _ = preempted
    stop = results[0]["stopped"]
    mesh = tx.make_mesh(jax.devices()[:devices], data=devices)
    plan, _, _, optimizer = worker.setup(mesh)
    ckpt = OrbaxCheckpoint(path, read_only=True)
    state = ckpt.restore(abstract_state(worker.make_model, plan, mesh, optimizer))
    assert int(state.step) == stop
    leaves = jax.tree.leaves(state)
    assert len(leaves[0].sharding.device_set) == devices
    with np.load(str(path) + ".npz", allow_pickle=False) as saved:
        assert len(saved.files) == len(leaves)
        for n, x in enumerate(leaves):
            np.testing.assert_array_equal(np.asarray(x), saved[f"arr_{n}"])


def test_resuming_on_one_process_continues_at_the_same_sample(preempted):
    _, results, path, _ = preempted
    stop = results[0]["stopped"]
    total = stop + 4
    plan, mesh, train, optimizer = worker.setup()  # 1 process x 8 devices

    def run(state, start, end):
        first = int(state.data_position) // worker.GLOBAL_BATCH
        for index in range(first, first + end - start):
            state, _ = train.step(state, worker.batch_at(index))
        return state, first

    ckpt = OrbaxCheckpoint(path, read_only=True)
    restored = ckpt.restore(abstract_state(worker.make_model, plan, mesh, optimizer))
    resumed, first = run(restored, stop, total)
    assert first == stop  # the 2-process run consumed exactly `stop` global batches
    reference, _ = run(train.init(worker.make_model, 0), 0, total)
    assert int(resumed.step) == int(reference.step) == total
    assert int(resumed.data_position) == total * worker.GLOBAL_BATCH
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        # 2 processes reduce with gloo, 1 in-process: float sums may round apart.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
