"""`CSV`: one row per log call, columns fixed at the first call."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import TrainerError
from ._base import _Closable, is_main_process
from ._format import to_float


def _cell(value: object) -> object:
    """Integers as they are, numbers as full-precision floats, the rest as text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    x = to_float(value)
    return str(value) if x is None else x


class CSV(_Closable):
    """Writes metrics to a CSV file, one flushed row per log call.

    The columns are `step`, the metric names of the first `log` call in their order,
    and `extra`: a metric first seen later goes into `extra` as JSON
    (`{"eval_loss": 1.5}`), so rows never change shape. A metric missing from a
    later call leaves its cell empty. `header` writes its info to the sidecar file
    `<path>.header.json`.

    **Arguments:**

    - `path`: the CSV file; parent folders are created.
    - `append`: add rows to an existing file, keeping its columns (to continue a
        resumed run) instead of starting it afresh.
    - `all_processes`: write on every process (give each its own `path`), not only
        on process 0; elsewhere the logger creates no file and writes nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        append: bool = False,
        all_processes: bool = False,
    ):
        self.path = Path(path)
        self.append = append
        self.all_processes = all_processes
        self.columns: list[str] | None = None
        self._file: Any = None
        self._closed = False
        # Checked now (reading is harmless on any process); opened on first use.
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                self.columns = next(csv.reader(f), None)
            columns = self.columns or []
            if len(columns) < 2 or columns[0] != "step" or columns[-1] != "extra":
                raise TrainerError(
                    f"Expected `{self.path}` to have a `step,...,extra` header row "
                    f"(a Titanax CSV) to append to, found {self.columns!r}.",
                    suggestion="Pass `append=False` to start the file afresh, or "
                    "another `path`.",
                )

    def _open(self) -> bool:
        """Open the file on first use (process 0 only); whether to write."""
        if self._closed:
            raise TrainerError(
                f"`CSV({str(self.path)!r})` was used after `close()`.",
                suggestion="Create a new `CSV` logger, with `append=True` to add "
                "to the same file.",
            )
        if self._file is not None:
            return True
        if not (self.all_processes or is_main_process()):
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append = self.append and self.columns is not None
        self._file = self.path.open("a" if append else "w", newline="")
        self._writer = csv.writer(self._file)
        return True

    @property
    def header_path(self) -> Path:
        """The sidecar file `header` writes: `<path>.header.json`."""
        return self.path.with_name(self.path.name + ".header.json")

    def header(self, info: Mapping[str, object]) -> None:
        """Write `info` as JSON to `header_path` (values JSON cannot hold as text).

        **Arguments:**

        - `info`: ordered entries.

        **Returns:**

        Nothing.
        """
        if not self._open():
            return
        with self.header_path.open("w") as f:
            json.dump(dict(info), f, indent=2, default=str)
            f.write("\n")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row for `step`.

        **Arguments:**

        - `step`: the optimizer step.
        - `metrics`: host numbers by name.

        **Returns:**

        Nothing.
        """
        if not self._open():
            return
        if self.columns is None:
            self.columns = ["step", *(k for k in metrics if k != "step"), "extra"]
            self._writer.writerow(self.columns)
        known = set(self.columns)
        extra = {k: _cell(v) for k, v in metrics.items() if k not in known}
        row = [step, *(_cell(metrics.get(k, "")) for k in self.columns[1:-1])]
        row.append(json.dumps(extra, default=str) if extra else "")
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        """Close the file; calling it twice is harmless.

        **Returns:**

        Nothing.
        """
        if self._file is not None:
            self._file.close()
        self._closed = True
