"""The logger protocol: what the trainer calls on every logger it is given."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax

# Optional logger methods a trainer calls only on loggers that define them.
OPTIONAL_METHODS = ("event", "histograms")


@runtime_checkable
class Logger(Protocol):
    """What every Titanax logger implements; any object with these methods works.

    The trainer calls `header` once before the first step, `log` at each log step
    with metrics already fetched to the host, and `close` at the end. Titanax's
    loggers are also context managers that call `close` on exit, and write on
    process 0 only.

    Two optional methods are called only on loggers that define them (see `emit`):

    - `event(name, seconds)`: a start-up phase finished (`"place model"`,
        `"restore checkpoint"`, `"compile step"`) and how long it took.
    - `histograms(step, groups)`: per-layer values as histograms, e.g.
        `{"param_norm": {"GPT.blocks.mlp.w_in": array([...per layer...]), ...},
        "grad_norm": {...}}` (see `layer_norms`).

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


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs (always, on one host)."""
    return jax.process_index() == 0


def emit(loggers: Iterable[Any], method: str, *args: Any) -> None:
    """Call an optional logger method on every logger that defines it.

    **Arguments:**

    - `loggers`: the loggers.
    - `method`: `"event"` or `"histograms"` (or any method name).
    - `*args`: its arguments.

    **Returns:** Nothing.

    !!! Example

        ```python
        tx.loggers.emit(loggers, "event", "compile step", 3.2)
        ```
    """
    for logger in loggers:
        fn = getattr(logger, method, None)
        if callable(fn):
            fn(*args)


class _Closable(abc.ABC):
    """Context-manager support: `with CSV(path) as log: ...` closes on exit."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class WithHeader:
    """A logger whose header gets extra entries (e.g. the resolved config).

    Every other call, optional methods included, goes to the wrapped logger;
    `event`s that come before the header are held back and passed on right after
    it, so start-up phases print below the header whoever announces them first.

    **Arguments:**

    - `logger`: the logger to wrap.
    - `**extra`: entries appended to the `info` its `header` receives.

    !!! Example

        ```python
        logger = tx.loggers.WithHeader(tx.loggers.Basic(), config="steps: 20")
        ```
    """

    def __init__(self, logger: Any, **extra: object):
        self.logger = logger
        self.extra = dict(extra)
        self._pending: list[tuple[str, float]] | None = []

    def header(self, info: Mapping[str, object]) -> None:
        """Pass `info` plus the extra entries to the wrapped logger's `header`,
        then the events held back.

        **Arguments:**

        - `info`: ordered entries.

        **Returns:**

        Nothing.
        """
        self.logger.header({**info, **self.extra})
        pending, self._pending = self._pending or [], None
        for name, seconds in pending:
            emit([self.logger], "event", name, seconds)

    def event(self, name: str, seconds: float) -> None:
        """The wrapped logger's `event` (held back until the header).

        **Arguments:**

        - `name`: the phase.
        - `seconds`: its time.

        **Returns:**

        Nothing.
        """
        if self._pending is not None:
            self._pending.append((name, seconds))
        else:
            emit([self.logger], "event", name, seconds)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """The wrapped logger's `log`.

        **Arguments:**

        - `step`: the optimizer step.
        - `metrics`: host numbers by name.

        **Returns:**

        Nothing.
        """
        self.logger.log(step, metrics)

    def close(self) -> None:
        """The wrapped logger's `close`.

        **Returns:**

        Nothing.
        """
        self.logger.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("logger", "extra", "_pending"):
            raise AttributeError(name)
        return getattr(self.logger, name)
