"""Save failures are loud and early: bad paths, full and read-only filesystems.

The disk tests run `_resume_worker.py` on a small tmpfs mounted in a private mount
namespace (`unshare -m`; as a non-root user `unshare -rm`), so nothing outside the
test sees the mount. They are skipped, with the reason, where mounting is not
allowed. Each prints its timings: the error must come at the step after the failed
save started, and the process must exit within seconds (Orbax's threads used to
hold it for 300 s on a read-only mount).
"""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

import titanax as tx
from titanax.checkpoint import OrbaxCheckpoint
from titanax.checkpoint._failures import SaveWatch
from titanax.checkpoint._metadata import scan

WORKER = Path(__file__).with_name("_resume_worker.py")
TIMEOUT_S = 180
# Mount a tmpfs, run the worker on it, note when it exited, copy the checkpoint out
# (the mount disappears with the namespace), then try to open a new checkpoint
# directory there (read-only mounts must fail in the constructor).
SCRIPT = """
mount -t tmpfs -o size=16m tmpfs "$MNT" || exit 97
"$PY" "$WORKER" --dir "$MNT/ckpt" --mount "$MNT" "$@"
rc=$?
echo "exited $rc"
cp -a "$MNT/ckpt" "$OUT/" 2>/dev/null
"$PY" -c "from titanax.checkpoint import OrbaxCheckpoint; OrbaxCheckpoint('$MNT/new')" \
    2> "$OUT/constructor.txt"
exit $rc
"""


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
        PYTHONPATH=str(WORKER.parents[1]),
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def on_tmpfs(env, tmp_path, *args):
    """Run the worker on a fresh tmpfs; (exit code, {line: time read}, stderr,
    the checkpoint copied out, the constructor's stderr there)."""
    if shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs needs `unshare` (util-linux), not found")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    cmd = [*unshare, "sh", "-c", SCRIPT, "sh", *map(str, args)]
    env = dict(env, MNT=str(mnt), OUT=str(out), PY=sys.executable, WORKER=str(WORKER))
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        watchdog = threading.Timer(TIMEOUT_S, proc.kill)  # never hang
        watchdog.start()
        seen = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            seen[line.strip()] = time.monotonic()
        proc.wait()
        watchdog.cancel()
    text = err.read_text()
    if proc.returncode == 97 or (proc.returncode != 0 and not seen):
        pytest.skip(
            "mounting a tmpfs in a private mount namespace is not allowed here "
            f"(needs root or user namespaces): {text.strip()[-300:]}"
        )
    constructor = out / "constructor.txt"
    return (
        proc.returncode,
        seen,
        text,
        out / "ckpt",
        constructor.read_text() if constructor.exists() else "",
    )


def error_line(seen):
    line = next(x for x in seen if x.startswith("error "))
    _, step, since = line.split()
    return line, int(step), float(since)


def test_full_disk_fails_at_the_next_step_and_keeps_the_previous_step(env, tmp_path):
    """Steps 5 and 10 save (3.3 MB each); the disk is filled before step 15 with
    256 KB left, so the directory and JSON fit but the arrays do not: the
    background write fails. Steps take 0.5 s from then on; the error must come
    at the first step after the write failed (0.6 s after the save started on a
    quiet machine, 1.6 s on a loaded one), long before the next save (step 20)."""
    rc, seen, stderr, ckpt, _ = on_tmpfs(
        env, tmp_path, "--hidden", 256, 256, "--fill-disk-at", 15, "--slow", 0.5
    )
    assert rc == 1, stderr[-3000:]
    line, step, since = error_line(seen)
    print(f"\n{line}: raised {since:.2f} s after the failed save started")
    assert "saving 15" in seen and 16 <= step < 20  # not at the next save
    assert since < 5 and step <= 16 + since / 0.5  # the first step after failing
    exit_s = seen["exited 1"] - seen[line]
    print(f"process exited {exit_s:.2f} s after the error")
    assert exit_s < 10
    last = stderr.strip().splitlines()
    error = next(x for x in reversed(last) if "CheckpointError" in x)
    assert "Saving checkpoint step 15" in error
    assert "[Errno 28] No space left on device" in error
    assert "The latest intact step is 10" in error
    assert "unfinished directory was removed" in error
    assert "Fix: Free space" in stderr
    assert scan(ckpt) == ([5, 10], [])  # no tmp directory left behind
    report = OrbaxCheckpoint(ckpt, read_only=True).verify()
    assert report == {5: None, 10: None}


def test_read_only_filesystem_fails_at_once_without_a_hang(env, tmp_path):
    rc, seen, stderr, ckpt, constructor = on_tmpfs(
        env, tmp_path, "--read-only-at", 15, "--slow", 0.5
    )
    assert rc == 1, stderr[-3000:]
    line, step, since = error_line(seen)
    exit_s = seen["exited 1"] - seen[line]
    print(f"\n{line}; process exited {exit_s:.2f} s after the error")
    assert step == 15 and since < 5  # raised by save() itself
    assert exit_s < 10
    assert "[Errno 30] Read-only file system" in stderr
    assert "The latest intact step is 10" in stderr
    assert scan(ckpt) == ([5, 10], [])
    assert OrbaxCheckpoint(ckpt, read_only=True).verify() == {5: None, 10: None}
    # A new checkpoint directory on the read-only mount fails in the constructor.
    assert "CheckpointError: Expected a writable checkpoint directory" in constructor
    assert "[Errno 30] Read-only file system" in constructor


def test_constructor_rejects_a_file_and_a_path_under_a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(tx.CheckpointError, match="for checkpoints at .*found a file"):
        OrbaxCheckpoint(file)
    with pytest.raises(tx.CheckpointError, match=r"but `.*/file` is a file"):
        OrbaxCheckpoint(file / "run")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no probe left behind


def test_save_rejects_negative_and_non_int_steps(tmp_path):
    ckpt = OrbaxCheckpoint(tmp_path / "run")
    state = {"w": jnp.ones(3)}
    for bad in (-3, 2.5, True, "4"):
        with pytest.raises(tx.CheckpointError, match=r"expects an int ≥ 0, got"):
            ckpt.save(state, step=bad, force=True)
    assert ckpt.save(state, step=0, force=True)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "run")) == ["0"]


def test_existing_needs_a_finished_step_and_creates_nothing(tmp_path):
    with pytest.raises(tx.CheckpointError, match="found nothing"):
        OrbaxCheckpoint.existing(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(tx.CheckpointError, match="found no finished step"):
        OrbaxCheckpoint.existing(tmp_path / "empty")
    (tmp_path / "empty" / "4.orbax-checkpoint-tmp-1").mkdir()
    with pytest.raises(tx.CheckpointError, match="only unfinished saves"):
        OrbaxCheckpoint.existing(tmp_path / "empty")
    with OrbaxCheckpoint(tmp_path / "run") as ckpt:
        ckpt.save({"w": jnp.ones(3)}, step=2, force=True)
    assert OrbaxCheckpoint.existing(tmp_path / "run").steps() == [2]


def test_waits_are_bounded(tmp_path):
    """A background save that never finishes makes `wait` raise after the bound
    instead of blocking the loop (or the exit) forever."""
    release = threading.Event()
    watch = SaveWatch(tmp_path, lambda: release.wait(30))
    watch.started(7)
    start = time.monotonic()
    assert not watch.join(0.2)
    assert time.monotonic() - start < 2
    release.set()
    assert watch.join(5)
    assert watch.failure is not None  # it returned, but step 7 was never committed
    assert "Saving checkpoint step 7" in str(watch.failure)
