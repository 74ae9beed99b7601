"""`Profile`: a `jax.profiler` trace of a window of training steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from .._errors import TrainerError
from ._base import is_main_process


class Profile:
    """Captures a `jax.profiler` trace of steps `[start, start + steps)`.

    Step `k` is the step that takes `state.step` from `k` to `k + 1`. A training
    loop calls `before_step(k)` before dispatching step `k` and `after_step(k + 1,
    outputs)` after; the trace starts before step `start` and stops once step
    `start + steps - 1` has finished on the devices. Open the result with
    `tensorboard --logdir <logdir>` (Profile tab) or load the `.xplane.pb` /
    `.trace.json.gz` under `<logdir>/plugins/profile/` into Perfetto.

    **Arguments:**

    - `start`: the first step traced (skip the compiling step 0 to see the steady
        state).
    - `steps`: how many steps to trace.
    - `logdir`: where the trace goes.
    - `all_processes`: trace on every process, not only on process 0.

    !!! Example

        ```python
        profile = tx.loggers.Profile(start=10, steps=3, logdir="runs/profile")
        ```
    """

    def __init__(
        self,
        start: int,
        steps: int = 3,
        logdir: str | os.PathLike[str] = "profile",
        *,
        all_processes: bool = False,
    ):
        for name, value, low in (("start", start, 0), ("steps", steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrainerError(
                    f"Expected `Profile({name}=...)` to be an integer >= {low}, got "
                    f"{value!r}.",
                    suggestion="Pass e.g. `Profile(start=10, steps=3)`.",
                )
        self.start = start
        self.steps = steps
        self.logdir = Path(logdir)
        self.all_processes = all_processes
        self.running = False
        self.done = False

    @property
    def stop_at(self) -> int:
        """The step count after which the trace stops (`start + steps`)."""
        return self.start + self.steps

    def before_step(self, step: int) -> None:
        """Start the trace if step `step` is the window's first.

        **Arguments:**

        - `step`: `state.step` before the step runs.

        **Returns:** Nothing.
        """
        if self.done or self.running or step < self.start or step >= self.stop_at:
            return
        if not (self.all_processes or is_main_process()):
            self.done = True
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.logdir))
        self.running = True

    def after_step(self, step: int, outputs: Any = None) -> None:
        """Stop the trace once the window's last step has run.

        **Arguments:**

        - `step`: `state.step` after the step.
        - `outputs`: the step's outputs; waited for before stopping, so the trace
            holds the device work of the last step.

        **Returns:** Nothing.
        """
        if self.running and step >= self.stop_at:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stop a running trace (a run that ended inside the window).

        **Returns:** Nothing.
        """
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
            self.done = True

    def trace_files(self) -> list[Path]:
        """The trace files written so far under `logdir`."""
        return sorted(self.logdir.glob("plugins/profile/*/*"))
