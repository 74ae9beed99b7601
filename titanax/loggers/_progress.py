"""`Progress`: a tqdm progress bar on a terminal, on process 0 only."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ._base import _Closable, is_main_process
from ._console import format_event, format_header
from ._format import format_loss, format_rate, to_float


def _is_tty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress(_Closable):
    """A progress bar: `step/total`, elapsed and ETA, loss and tokens/s.

    It draws only when its stream is a terminal and on process 0; anywhere else
    (output piped to a file, other processes) it does nothing, so a `Basic` logger
    should carry the log there (`titanax train` picks one or the other). The header
    and start-up phases are printed above the bar.

    **Arguments:**

    - `stream`: where to draw; `None` means `sys.stdout` at the first call.
    - `total`: the last step; by default `info["total_steps"]` from `header`.
    - `force`: draw even when the stream is not a terminal (for tests and notebooks).
    """

    def __init__(
        self, stream: TextIO | None = None, *, total: int | None = None, force=False
    ):
        self.stream = stream
        self.total = total
        self.force = force
        self._bar: Any = None
        self._start = 0
        self._active: bool | None = None

    @staticmethod
    def available(stream: TextIO | None = None) -> bool:
        """Whether a bar would be drawn on `stream` (default stdout): a terminal,
        on process 0."""
        return _is_tty(sys.stdout if stream is None else stream) and is_main_process()

    def _on(self) -> bool:
        if self._active is None:
            stream = sys.stdout if self.stream is None else self.stream
            self._active = is_main_process() and (self.force or _is_tty(stream))
        return self._active

    def _stream(self) -> TextIO:
        return sys.stdout if self.stream is None else self.stream

    def _print(self, lines: list[str]) -> None:
        if self._bar is not None:
            for line in lines:
                self._bar.write(line, file=self._stream())
        else:
            self._stream().write("".join(f"{line}\n" for line in lines))
            self._stream().flush()

    def header(self, info: Mapping[str, object]) -> None:
        """Print the header and open the bar at `info["start_step"]` (default 0)
        of `info["total_steps"]` (or `total`).

        **Arguments:**

        - `info`: ordered entries; `total_steps` and `start_step` size the bar.

        **Returns:**

        Nothing.
        """
        if not self._on():
            return
        self._print(format_header(info))
        total = self.total if self.total is not None else info.get("total_steps")
        start = info.get("start_step", 0)
        self._start = start if isinstance(start, int) else 0
        self._open(total if isinstance(total, int) else None)

    def _open(self, total: int | None) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=total,
                initial=self._start,
                unit="step",
                file=self._stream(),
                dynamic_ncols=True,
                leave=True,
            )

    def event(self, name: str, seconds: float) -> None:
        """Print a start-up phase above the bar.

        **Arguments:**

        - `name`: the phase.
        - `seconds`: its time.

        **Returns:**

        Nothing.
        """
        if self._on():
            self._print([format_event(name, seconds)])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Move the bar to `step`; show the loss and tokens/s (or samples/s).

        **Arguments:**

        - `step`: the optimizer step.
        - `metrics`: host numbers by name.

        **Returns:**

        Nothing.
        """
        if not self._on():
            return
        self._open(self.total)
        bar = self._bar
        parts = []
        if "loss" in metrics:
            parts.append(f"loss {format_loss(metrics['loss'])}")
        for key, unit in (("tokens_per_s", "tok/s"), ("samples_per_s", "samples/s")):
            rate = to_float(metrics.get(key))
            if rate is not None:
                parts.append(f"{format_rate(rate)} {unit}")
                break
        bar.set_postfix_str(" | ".join(parts), refresh=False)
        bar.update(max(0, step - bar.n))

    def close(self) -> None:
        """Close the bar (it stays on screen); calling it twice is harmless.

        **Returns:**

        Nothing.
        """
        if self._bar is not None:
            self._bar.close()
            self._bar = None
