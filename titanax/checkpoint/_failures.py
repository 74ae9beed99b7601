"""Save failures, found as early as possible and reported loudly.

- Before training: `check_directory` refuses a checkpoint path that is a file, sits
  under a file, or cannot be written (it writes and removes a probe file: a
  permission check would pass for root on a read-only mount).
- While training: Orbax writes in background threads and keeps an error until the
  next save asks for it, so a full disk lost every step until then. `SaveWatch`
  waits for each background save in a daemon thread and records its failure
  (`failure`), which the loop reads every step (`OrbaxCheckpoint.raise_if_failed`,
  one attribute read). It removes the unfinished step's temporary directory when
  it can; the previous steps are never touched.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .._errors import CheckpointError

__all__ = ["SaveWatch", "check_directory", "os_error"]

_TMP_MARK = ".orbax-checkpoint-tmp"
# TensorStore reports the OS error as `[os_error_code='28']`.
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")


def os_error(error: BaseException) -> tuple[int | None, str]:
    """The OS error behind an Orbax/TensorStore failure: `(errno, text)`."""
    seen: BaseException | None = error
    chain = []
    while seen is not None and seen not in chain and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.errno, f"OSError: [Errno {cause.errno}] {cause.strerror}"
    for cause in chain:
        found = _TS_ERRNO.search(str(cause))
        if found:
            code = int(found.group(1))
            return code, f"OSError: [Errno {code}] {os.strerror(code)}"
    text = str(chain[-1]).split("See full TensorStore details")[0].strip()
    first = text.splitlines()[0][:300] if text else ""
    return None, f"{type(chain[-1]).__name__}: {first}"


def _fix(code: int | None, path: Path) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"Free space on the filesystem of `{path}` (`df -h {path}`), or save "
            "to a larger one; then resume from the latest intact step."
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"Make `{path}` writable (it is read-only or not yours), or pass "
            "another directory; then resume from the latest intact step."
        )
    return (
        f"Check the filesystem of `{path}` (mounted, healthy, writable); then resume "
        "from the latest intact step."
    )


def check_directory(path: Path) -> None:
    """Create `path` if needed and check that files can be written in it.

    **Raises:** `CheckpointError` if `path` is a file, lies under a file, or cannot
    be created or written (naming the OS error).
    """
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"Expected a directory for checkpoints at `{path}`, found a file.",
            path=str(path),
            suggestion="Pass a directory path (created if missing), not a file.",
        )
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(
            f"Expected a directory for checkpoints at `{path}`, but `{ancestor}` is "
            "a file.",
            path=str(path),
            suggestion="Pass a path whose parents are directories.",
        )
    probe = path / f".titanax-write-test-{os.getpid()}-{threading.get_ident()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"Expected a writable checkpoint directory at `{path}`, got "
            f"OSError: [Errno {e.errno}] {e.strerror}.",
            path=str(path),
            suggestion=_fix(e.errno, path),
        ) from None


def _remove_unfinished(path: Path, step: int) -> str:
    """Delete `<step>.orbax-checkpoint-tmp*` under `path`; a sentence saying so."""
    try:
        found = list(path.glob(f"{step}{_TMP_MARK}*"))
    except OSError:
        found = []
    left = []
    for entry in found:
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            left.append(entry)
    if left:
        return f" Its unfinished directory could not be removed: `{left[0]}`."
    return " Its unfinished directory was removed." if found else ""


class _SaveLeftovers(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports about a save whose
    failure was already reported (Orbax leaves its write futures unawaited; they
    are logged when collected, often at exit, after the real error)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (
            "exception was never retrieved" in text
            and _TMP_MARK in text
            and self.path in text
        )


def _finished_steps(path: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
    except OSError:
        return []


class SaveWatch:
    """Waits for each background save in a daemon thread; records the failure.

    **Arguments:**

    - `path`: the checkpoint directory.
    - `wait`: blocks until the background save finishes; raises if it failed
        (Orbax's `CheckpointManager.wait_until_finished`).
    - `cleanup`: whether this process removes unfinished directories (the
        primary process, so that hosts do not race).

    **Attributes:** `failure` (a `CheckpointError`, or None), `failed_at` (the
    `time.monotonic()` of the failure).
    """

    def __init__(self, path: Path, wait: Callable[[], None], cleanup: bool = True):
        self.path = path
        self.failure: CheckpointError | None = None
        self.failed_at: float | None = None
        self._wait = wait
        self._cleanup = cleanup
        self._thread: threading.Thread | None = None

    def started(self, step: int) -> None:
        """Watch the save of `step` that has just been started."""
        self._thread = threading.Thread(
            target=self._watch, args=(step,), name=f"titanax-save-{step}", daemon=True
        )
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the save being watched; False on timeout."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def fail(self, step: int, error: BaseException) -> CheckpointError:
        """Record (and return) the failure of the save of `step`."""
        # Orbax leaves the failed save's coroutines unfinished; collected now, their
        # reports come before this error, not after it at exit.
        gc.collect()
        code, text = os_error(error)
        tidy = _remove_unfinished(self.path, step) if self._cleanup else ""
        previous = [s for s in _finished_steps(self.path) if s != step]
        kept = (
            f"The latest intact step is {previous[-1]}."
            if previous
            else "No earlier step was saved."
        )
        failure = CheckpointError(
            f"Saving checkpoint step {step} to `{self.path}` failed: {text}. {kept}"
            f"{tidy}",
            path=str(self.path),
            suggestion=_fix(code, self.path),
        )
        if self.failure is None:
            logging.getLogger("asyncio").addFilter(_SaveLeftovers(self.path))
            self.failure = failure
            self.failed_at = time.monotonic()
        return failure

    def _watch(self, step: int) -> None:
        try:
            self._wait()
        except BaseException as e:  # noqa: BLE001 -- reported through `failure`
            self.fail(step, e)
            return
        if self._cleanup and not (self.path / str(step)).is_dir():
            # Orbax logged the failure and returned normally.
            self.fail(step, RuntimeError("the step was not committed"))
