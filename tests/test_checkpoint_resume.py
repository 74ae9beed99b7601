"""Exact resume across processes: SIGKILL, SIGTERM (preemption), kill during a save,
and a kill-9 fuzz.

Each test runs `_resume_worker.py` (30 steps of a small MLP, DP over 2 CPU devices,
a checkpoint every 5 steps) in subprocesses and compares the final state with an
uninterrupted run's: params, Adam state, step, RNG and data position must be
bitwise equal. Children share a JAX compilation cache, so only the first one
compiles. Every wait has a timeout; a child that overruns is killed. The fuzz
(`_kill_fuzz.py`) SIGKILLs a run 8 times at random moments, most while a save is
written; its long mode is `python benchmarks/checkpoint.py --fuzz 60`.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from titanax._mesh import make_mesh
from titanax._plan import DP, Plan
from titanax.checkpoint import OrbaxCheckpoint
from titanax.checkpoint._metadata import scan
from titanax.optim import adamw
from titanax.train import abstract_state

# See test_checkpoint.py: Orbax read noise after a damaged step is not a failure.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)

WORKER = Path(__file__).with_name("_resume_worker.py")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def start(env, *args):
    """Start a worker; stdout is a pipe, stderr a file (Orbax logs a lot)."""
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)  # never hang
    watchdog.start()
    return proc, err, watchdog


def finish(proc, err, watchdog, expect_rc=0):
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    err.seek(0)
    stderr = err.read()
    err.close()
    assert proc.returncode == expect_rc, (
        f"worker exited with {proc.returncode}, expected {expect_rc}.\n"
        f"stdout:\n{out[-2000:]}\nstderr (tail):\n{stderr[-3000:]}"
    )
    return out


def run(env, *args, expect_rc=0):
    return finish(*start(env, *args), expect_rc=expect_rc)


def assert_same_final_state(a, b):
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        assert len(x.files) == len(y.files) > 10
        for name in x.files:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted 30-step run's final state."""
    tmp = tmp_path_factory.mktemp("reference")
    out = run(env, "--dir", tmp / "ckpt", "--out", tmp / "final.npz")
    assert "done 30" in out
    return tmp / "final.npz"


def test_resume_after_sigkill_equals_an_uninterrupted_run(env, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = run(env, "--dir", ckpt, "--kill-after", 17, expect_rc=-signal.SIGKILL)
    assert "step 17" in out and "step 18" not in out
    # Step 15's asynchronous save may still have been in flight when the process
    # died (steps take milliseconds): then it is an unfinished tmp directory and
    # the run resumes from step 10. Either way the result must be exact.
    steps, unfinished = scan(ckpt)
    assert steps in ([5, 10, 15], [5, 10])
    assert [name.split(".")[0] for name in unfinished] == (
        [] if 15 in steps else ["15"]
    )
    out = run(env, "--dir", ckpt, "--resume", "--out", tmp_path / "final.npz")
    assert f"resumed {steps[-1]}" in out and "done 30" in out
    assert_same_final_state(tmp_path / "final.npz", reference)


def test_sigterm_saves_at_that_step_and_resumes_exactly(env, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc, err, watchdog = start(env, "--dir", ckpt, "--pause-after", 17)
    assert proc.stdout is not None
    for line in proc.stdout:  # the watchdog kills the child if this never comes
        if line.strip() == "paused 17":
            proc.send_signal(signal.SIGTERM)
            break
    out = finish(proc, err, watchdog)
    assert "preempted 17" in out and "step 18" not in out
    assert scan(ckpt) == ([10, 15, 17], [])  # keep=3
    out = run(env, "--dir", ckpt, "--resume", "--out", tmp_path / "final.npz")
    assert "resumed 17" in out and "done 30" in out
    assert_same_final_state(tmp_path / "final.npz", reference)


def test_kill_during_an_async_save_keeps_the_previous_step(env, tmp_path):
    """SIGKILL right after the asynchronous save of step 10 started (13 MB of
    state): step 10 stays an unfinished tmp directory, step 5 is the latest and
    restores (here resharded from the child's 2 devices onto 8), and step 10 can
    be saved again over the leftover."""
    ckpt = tmp_path / "ckpt"
    hidden = (1024, 1024)  # 1.07M parameters: 13 MB with Adam's two moments
    out = run(
        env,
        "--dir",
        ckpt,
        "--steps",
        10,
        "--hidden",
        *hidden,
        "--kill-during-save",
        10,
        expect_rc=-signal.SIGKILL,
    )
    assert "saving 10" in out
    steps, unfinished = scan(ckpt)
    assert steps == [5]
    assert [name.split(".")[0] for name in unfinished] == ["10"]

    import _resume_worker as worker  # tests/ is on sys.path under pytest

    plan, mesh = Plan(dp=DP("data")), make_mesh(data=8)

    def make_model(key):
        return worker.MLP(worker.IN, worker.OUT, hidden, key=key)

    with OrbaxCheckpoint(ckpt) as manager:
        assert manager.latest_step() == 5
        state = manager.restore(abstract_state(make_model, plan, mesh, adamw(1e-2)))
        assert int(state.step) == 5
        assert int(state.data_position) == 5 * worker.BATCH  # samples
        assert state.model.layers[1].weight.shape == hidden
        assert len(state.model.layers[1].weight.sharding.device_set) == 8
        assert np.isfinite(np.asarray(state.model.layers[1].weight)).all()
        assert manager.save(state, step=10, force=True)
        manager.wait()
        assert manager.steps() == [5, 10]
    assert jax.devices()  # the parent's devices were untouched by the children


def test_kill9_fuzz_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    from _kill_fuzz import fuzz

    report = fuzz(8, tmp_path, seed=1)
    print(f"\n{report}")
    assert report.kills == 8
    assert report.mid_save >= 4  # most kills land while a save is being written
    # Every resume started from the newest finished step (checked per kill), and
    # the steps on disk only move forward.
    assert report.resumed_from == sorted(report.resumed_from)
    assert report.equal
