"""`Trainer.fit` across process deaths, as a scheduler sees them: the same command
re-run after SIGKILL ends at `steps` bitwise equal to an uninterrupted run; SIGTERM
saves and exits with the documented code 75. Real processes (tests/_fit_worker.py),
8 simulated CPU devices each."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import titanax as tx

WORKER = Path(__file__).with_name("_fit_worker.py")
STEPS = 30


def run_worker(tmp: Path, *args: object, expect_rc: int = 0) -> str:
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--dir", str(tmp / "ckpt"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == expect_rc, (
        f"worker exited with {proc.returncode}, expected {expect_rc}.\n"
        f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def final_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return [f[name] for name in sorted(f.files, key=lambda n: int(n[4:]))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = run_worker(tmp, "--out", tmp / "final.npz")
    assert "resumed-from 0" in out and f"done {STEPS}" in out
    return final_arrays(tmp / "final.npz")


# A step drawn at random (seeded, so a failure reproduces), killed once the saves
# started so far are complete; and step 8, killed while its asynchronous save (every
# 4 steps) is in flight: the run resumes from step 8 or 4 (or 0 if step 4's save
# had not finished either).
KILLS = [(random.Random(12).randrange(5, STEPS), True), (8, False)]


@pytest.mark.parametrize(
    "kill_at,wait", KILLS, ids=[f"at_{KILLS[0][0]}_after_saves", "at_8_mid_save"]
)
def test_sigkill_then_the_same_command_ends_at_steps_bitwise_equal(
    tmp_path, uninterrupted, kill_at, wait
):
    flags = ["--kill-at", kill_at] + (["--wait-saves"] if wait else [])
    run_worker(tmp_path, *flags, expect_rc=-signal.SIGKILL)
    out = run_worker(tmp_path, "--out", tmp_path / "final.npz")
    resumed_from = int(out.split("resumed-from ")[1].split()[0])
    if wait:
        assert resumed_from == kill_at // 4 * 4  # the latest complete save
    else:
        assert resumed_from in (0, 4, 8)
    assert f"done {STEPS}" in out  # a total: not STEPS + resumed_from
    for got, want in zip(
        final_arrays(tmp_path / "final.npz"), uninterrupted, strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # Run again: already at `steps`, nothing to train, the same state.
    out = run_worker(tmp_path)
    assert f"resumed-from {STEPS}" in out and f"done {STEPS}" in out


def test_sigterm_saves_and_exits_75_then_resumes_exactly(tmp_path, uninterrupted):
    out = run_worker(tmp_path, "--term-at", 11, expect_rc=tx.Preempted.exit_code)
    assert tx.Preempted.exit_code == 75
    assert "preempted 11" in out and "done" not in out
    assert tx.OrbaxCheckpoint(tmp_path / "ckpt").latest_step() == 11
    out = run_worker(tmp_path, "--out", tmp_path / "final.npz")
    assert "resumed-from 11" in out and f"done {STEPS}" in out
    for got, want in zip(
        final_arrays(tmp_path / "final.npz"), uninterrupted, strict=True
    ):
        np.testing.assert_array_equal(got, want)
