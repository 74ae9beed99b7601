"""Console loggers: `Basic` (readable lines) and `CompactBasic` (short lines)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

from .._errors import TrainerError
from ._base import _Closable, is_main_process
from ._format import (
    SPECIAL_KEYS,
    format_loss,
    format_metric,
    format_ms,
    format_rate,
    format_value,
    to_float,
)

_RULE = "=" * 72


def _check_every(every: object) -> int | None:
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TrainerError(
            f"Expected `every` to be an integer >= 1 or None, got {every!r} instead.",
            suggestion="Pass e.g. `every=100` to print every 100th step, or None to "
            "print every call.",
        )
    return every


def format_header(info: Mapping[str, object]) -> list[str]:
    """The `Basic` header block: `key: value` lines, aligned, between rules."""
    lines = [_RULE]
    width = max((len(str(key)) for key in info), default=0) + 1
    for key, value in info.items():
        label = f"{str(key) + ':':<{width}} "
        first, *rest = format_value(value).splitlines() or [""]
        lines.append(f"{label}{first}".rstrip())
        lines.extend(f"{' ' * len(label)}{line}".rstrip() for line in rest)
    lines.append(_RULE)
    return lines


def format_event(name: str, seconds: float) -> str:
    """A start-up phase line: `[startup] compile step: 3.21 s`."""
    return f"[startup] {name}: {seconds:.2f} s"


def format_line(step: int, metrics: Mapping[str, object]) -> str:
    """The `Basic` log line: `step 100 | loss 2.3456 | ... | 12.3 ms/step`."""
    parts = [f"step {step}"]
    if "loss" in metrics:
        parts.append(f"loss {format_loss(metrics['loss'])}")
    for key, value in metrics.items():
        if key not in ("step", "loss", *SPECIAL_KEYS):
            parts.append(f"{key} {format_metric(key, value)}")
    special = {k: to_float(metrics[k]) for k in SPECIAL_KEYS if k in metrics}
    if (lr := special.get("lr")) is not None:
        parts.append(f"lr {lr:.2e}")
    if (rate := special.get("samples_per_s")) is not None:
        parts.append(f"{format_rate(rate)} samples/s")
    if (rate := special.get("tokens_per_s")) is not None:
        parts.append(f"{format_rate(rate)} tokens/s")
    if (seconds := special.get("step_time_s")) is not None:
        text = f"{format_ms(seconds)} ms/step"
        median, p90 = special.get("step_time_median_s"), special.get("step_time_p90_s")
        if median is not None and p90 is not None:
            text += f" (median {format_ms(median)}, p90 {format_ms(p90)})"
        parts.append(text)
    if (mfu := special.get("mfu")) is not None:
        parts.append(f"mfu {mfu * 100:.1f}%")
    if (seconds := special.get("compile_time_s")) is not None:
        parts.append(f"compile {seconds:.2f} s")
    if (used := special.get("memory_gb")) is not None:
        peak = special.get("memory_peak_gb")
        tail = "" if peak is None else f" (peak {peak:.2f})"
        parts.append(f"mem {used:.2f} GB{tail}")
    return " | ".join(parts)


def format_compact_header(info: Mapping[str, object]) -> list[str]:
    """One line of the mapping entries (versions), one of the rest."""
    mappings = [format_value(v) for v in info.values() if isinstance(v, Mapping)]
    others = [
        f"{key} {' '.join(format_value(value).split())}"
        for key, value in info.items()
        if not isinstance(value, Mapping)
    ]
    return [" | ".join(group) for group in (mappings, others) if group]


def format_compact_line(step: int, metrics: Mapping[str, object]) -> str:
    """The `CompactBasic` log line: `[  100] loss 2.3456 lr 1.0e-03 12.3ms`."""
    parts = [f"[{step:>5}]"]
    if "loss" in metrics:
        parts.append(f"loss {format_loss(metrics['loss'])}")
    for key, value in metrics.items():
        if key not in ("step", "loss", *SPECIAL_KEYS):
            parts.append(f"{key} {format_metric(key, value)}")
    if (lr := to_float(metrics.get("lr"))) is not None:
        parts.append(f"lr {lr:.1e}")
    if (seconds := to_float(metrics.get("step_time_s"))) is not None:
        parts.append(f"{format_ms(seconds)}ms")
    return " ".join(parts)


class Basic(_Closable):
    """Prints a header block and one readable line per log call.

    A line looks like `step 100 | loss 2.3456 | accuracy 0.91 | lr 1.00e-03 |
    1234 samples/s | 12.3 ms/step`: the step, `loss`, the other metrics in the
    order given, then `lr`, `samples_per_s`, `tokens_per_s`, `step_time_s` and `mfu`
    when present.

    **Arguments:**

    - `stream`: where to print; `None` means `sys.stdout` at the time of printing.
    - `every`: print only steps that are a multiple of this; `None` prints every
        call (the trainer already decides when to log).
    - `all_processes`: print on every process, not only on process 0.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        every: int | None = None,
        *,
        all_processes: bool = False,
    ):
        self.stream = stream
        self.every = _check_every(every)
        self.all_processes = all_processes

    def _write(self, lines: list[str]) -> None:
        if not (self.all_processes or is_main_process()):
            return
        stream = sys.stdout if self.stream is None else self.stream
        stream.write("".join(f"{line}\n" for line in lines))
        stream.flush()

    def header(self, info: Mapping[str, object]) -> None:
        """Print `info` as aligned `key: value` lines between two rules.

        **Arguments:**

        - `info`: ordered entries; mapping values print as `key value | ...`,
            multi-line values are indented under the first line.

        **Returns:**

        Nothing.
        """
        self._write(format_header(info))

    def event(self, name: str, seconds: float) -> None:
        """Print a start-up phase and its time: `[startup] compile step: 3.21 s`.

        **Arguments:**

        - `name`: the phase (`"place model"`, `"compile step"`, ...).
        - `seconds`: how long it took.

        **Returns:**

        Nothing.
        """
        self._write([format_event(name, seconds)])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Print one line for `step`.

        **Arguments:**

        - `step`: the optimizer step.
        - `metrics`: host numbers by name.

        **Returns:**

        Nothing.
        """
        if self.every is None or step % self.every == 0:
            self._write([format_line(step, metrics)])

    def close(self) -> None:
        """Flush the stream (it is not closed: it belongs to the caller).

        **Returns:**

        Nothing.
        """
        (sys.stdout if self.stream is None else self.stream).flush()


class CompactBasic(Basic):
    """Like `Basic`, on short lines: `[  100] loss 2.3456 lr 1.0e-03 12.3ms`.

    The line keeps the step, `loss`, the other metrics, `lr` and the step time;
    throughput and MFU are left out. The header takes one or two lines.

    **Arguments:**

    - `stream`: where to print; `None` means `sys.stdout` at the time of printing.
    - `every`: print only steps that are a multiple of this; `None` prints every
        call.
    """

    def header(self, info: Mapping[str, object]) -> None:
        """Print `info` on one line of versions and one of everything else.

        **Arguments:**

        - `info`: ordered entries.

        **Returns:**

        Nothing.
        """
        self._write(format_compact_header(info))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Print one short line for `step`.

        **Arguments:**

        - `step`: the optimizer step.
        - `metrics`: host numbers by name.

        **Returns:**

        Nothing.
        """
        if self.every is None or step % self.every == 0:
            self._write([format_compact_line(step, metrics)])
