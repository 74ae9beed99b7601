"""`PreemptionGuard`: turn SIGTERM into a flag a training loop polls.

Schedulers (Slurm, Kubernetes, cloud spot VMs) announce preemption with SIGTERM and
a grace period before SIGKILL. The default handler kills the process mid-step; the
guard instead records the request so the loop can finish its step, save, and exit.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from .._errors import CheckpointError

__all__ = ["PreemptionGuard"]


class PreemptionGuard:
    """A context manager that catches termination signals and sets a flag.

    Inside the `with` block, the first SIGTERM (or any of `signals`) sets
    `requested`; the loop should finish the current step, save and return. A
    second one of the same signal is passed to the previous handler (by default:
    the process terminates), so a stuck run can still be stopped. On exit the
    previous handlers are restored.

    Signal handlers can only be installed from the main thread; elsewhere the guard
    installs nothing, and `requested` is only set by `request()`.

    **Arguments:**

    - `signals`: the signals to catch (default: `SIGTERM`).

    !!! Example
        ```python
        with tx.PreemptionGuard() as guard:
            for batch in data:
                state, metrics = step(state, batch)
                if guard.requested:
                    ckpt.save(state, force=True)
                    ckpt.wait()
                    break
        ```
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        signals = tuple(signals)
        if not signals:
            raise CheckpointError(
                "`PreemptionGuard(signals=...)` got no signals.",
                suggestion="Use the default (`signal.SIGTERM`) or list some.",
            )
        self.signals = signals
        self.signal: int | None = None
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a caught signal (or `request()`) asked the run to stop."""
        return self._requested.is_set()

    def request(self, signum: int | None = None) -> None:
        """Set `requested`, as a caught signal would (for other stop sources)."""
        if not self._requested.is_set():
            self.signal = signum
        self._requested.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._requested.is_set():
            self.request(signum)
            return
        # A second signal: the user (or scheduler) insists. Defer to the old handler.
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
