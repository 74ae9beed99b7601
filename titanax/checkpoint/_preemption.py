"""`PreemptionGuard`: SIGTERM as a stop step that every process agrees on.

Schedulers (Slurm, Kubernetes, cloud spot VMs) announce preemption with SIGTERM and
a grace period before SIGKILL. The default handler kills the process mid-step; the
guard instead lets the loop finish its step, save, and exit.

With several processes the signal may reach only some of them, at different steps;
if each stopped on its own, they would save different steps (or hang in the save's
collectives). JAX's preemption service (started by `jax.distributed.initialize`)
solves exactly this: its handler reports SIGTERM to the coordinator, and
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)` becomes True
on every process at the same step. `should_stop(step)` is that call on many
processes, and the local flag (one attribute read) on one.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import jax

from .._compat import preemption_service_enabled, reached_preemption_sync_point
from .._errors import CheckpointError

__all__ = ["PreemptionGuard"]


class PreemptionGuard:
    """A context manager that turns termination signals into an agreed stop step.

    Call `should_stop(step)` once per training step, with the same step numbers on
    every process. It returns True at one step, the same on every process, after
    any process received a termination signal (or called `request()`): the loop
    then saves that step on all processes and exits.

    - One process: inside the `with` block, the first signal sets `requested`
        and `should_stop` returns it (one attribute read, ~0.05 µs). A second one
        of the same signal goes to the previous handler (by default the process
        terminates), so a stuck run can still be stopped.
    - Several processes (`jax.distributed` initialised): SIGTERM is left to JAX's
        preemption handler, and `should_stop` asks JAX's preemption sync point
        (~10–20 µs a call, no device work). Other `signals` and `request()` are
        forwarded to it as a SIGTERM to this process. Every process must call
        `should_stop` at every step, starting from the same step.

    Signal handlers can only be installed from the main thread; elsewhere the guard
    installs nothing and only `request()` stops the run.

    **Arguments:**

    - `signals`: the signals to catch (default: `SIGTERM`).

    !!! Example
        ```python
        with tx.PreemptionGuard() as guard:
            for batch in data:
                state, metrics = step(state, batch)
                n += 1
                if guard.should_stop(n):          # same n on every process
                    ckpt.save(state, step=n, force=True)
                    ckpt.wait()
                    raise SystemExit(75)          # EX_TEMPFAIL: requeue me
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
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._lock = threading.Lock()
        # Decided on entry (or the first call): asking JAX for the process count
        # here would start its backend before `jax.distributed.initialize`.
        self._many: bool | None = None

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save `step` and stop; the same on every process.

        **Arguments:**

        - `step`: the step just finished (an int, increasing by one per call).
        """
        many = self._many
        if many is None:
            many = self._many = _multiprocess()
        if not many:
            return self.requested
        return reached_preemption_sync_point(step)

    def request(self, signum: int | None = None) -> None:
        """Ask the run to stop, as a caught signal would (for other stop sources)."""
        with self._lock:
            first = not self.requested
            if first:
                self.signal = signum
                self.requested = True
        if first and signum != signal.SIGTERM and _multiprocess():
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption handler

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
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
        self._many = _multiprocess()
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if self._many and signum == signal.SIGTERM:
                    continue  # JAX's own handler reports it to the coordinator
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def _multiprocess() -> bool:
    """True when several processes run and JAX's preemption service is on.

    **Raises:** `CheckpointError` if several processes run without it.
    """
    if jax.process_count() == 1:
        return False
    if not preemption_service_enabled():
        raise CheckpointError(
            f"Expected JAX's preemption service with {jax.process_count()} "
            "processes, got `jax_enable_preemption_service=False`: the processes "
            "could not agree on a step to stop at.",
            suggestion=(
                "Leave `jax_enable_preemption_service` on (the default) before "
                "`jax.distributed.initialize`."
            ),
        )
    return True
