"""The logger protocol: what the trainer calls on every logger it is given."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Protocol, runtime_checkable


@runtime_checkable
class Logger(Protocol):
    """What every Titanax logger implements; any object with these methods works.

    The trainer calls `header` once before the first step, `log` at each log step
    with metrics already fetched to the host, and `close` at the end. Titanax's
    loggers are also context managers that call `close` on exit.

    !!! Example

        ```python
        class PrintLoss:
            def header(self, info): pass
            def log(self, step, metrics): print(step, metrics["loss"])
            def close(self): pass
        ```
    """

    def header(self, info: Mapping[str, object]) -> None:
        """Record the run's description once, at the start.

        **Arguments:**

        - `info`: ordered `name -> value` entries (versions, devices, mesh, plan,
            optimizer, ...); see `run_header`.

        **Returns:**

        Nothing.
        """
        ...

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of one step.

        **Arguments:**

        - `step`: the optimizer step the metrics belong to.
        - `metrics`: `name -> value`, host numbers. Keys with a fixed meaning:
            `loss`, `lr`, `samples_per_s`, `tokens_per_s`, `step_time_s`, `mfu`.

        **Returns:**

        Nothing.
        """
        ...

    def close(self) -> None:
        """Flush and release files; calling it twice is harmless.

        **Returns:**

        Nothing.
        """
        ...


class _Closable(abc.ABC):
    """Context-manager support: `with CSV(path) as log: ...` closes on exit."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
