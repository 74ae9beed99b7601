"""`TensorBoard`: scalars, per-layer histograms and the run header via tensorboardX."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import TrainerError
from ._base import _Closable, is_main_process
from ._console import format_header
from ._format import to_float


class TensorBoard(_Closable):
    """Writes each metric as a TensorBoard scalar, per-layer values as histograms,
    start-up phases as scalars and the header as text; on process 0 only.

    Needs `tensorboardX` (`pip install titanax[tensorboard]`), imported when a
    `TensorBoard` logger is created. View with `tensorboard --logdir <logdir>`.

    **Arguments:**

    - `logdir`: the folder for the event files (created on first write).
    - `flush_secs`: how often the writer flushes to disk, in seconds; `close`
        flushes too.
    - `all_processes`: write on every process (give each its own `logdir`).
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        flush_secs: int = 30,
        all_processes: bool = False,
    ):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise TrainerError(
                "`TensorBoard` needs the `tensorboardX` package, which is not "
                "installed.",
                suggestion="pip install titanax[tensorboard]",
            ) from e
        self.logdir = os.fspath(logdir)
        self.flush_secs = flush_secs
        self.all_processes = all_processes
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._closed = False

    def _open(self) -> Any:
        """The writer, created on first use on process 0; None elsewhere."""
        if self._closed:
            raise TrainerError(
                f"`TensorBoard({self.logdir!r})` was used after `close()`.",
                suggestion="Create a new `TensorBoard` logger.",
            )
        if self._writer is None and (self.all_processes or is_main_process()):
            self._writer = self._writer_class(
                logdir=self.logdir, flush_secs=self.flush_secs
            )
        return self._writer

    def header(self, info: Mapping[str, object]) -> None:
        """Write `info` as the text entry `run` at step 0, as `Basic` prints it.

        **Arguments:**

        - `info`: ordered entries.

        **Returns:**

        Nothing.
        """
        writer = self._open()
        if writer is None:
            return
        # Indented 4 spaces: a Markdown code block, so the columns stay aligned.
        text = "\n".join(f"    {line}" for line in format_header(info))
        writer.add_text("run", text, 0)

    def event(self, name: str, seconds: float) -> None:
        """Write a start-up phase's time as the scalar `startup/<name>_s` at step 0.

        **Arguments:**

        - `name`: the phase (`"compile step"` becomes `startup/compile_step_s`).
        - `seconds`: how long it took.

        **Returns:**

        Nothing.
        """
        writer = self._open()
        if writer is not None:
            writer.add_scalar(f"startup/{name.replace(' ', '_')}_s", seconds, 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Add one scalar per numeric metric, tagged with its name.

        **Arguments:**

        - `step`: the optimizer step (the x axis).
        - `metrics`: host numbers by name; values that are not numbers are skipped.

        **Returns:**

        Nothing.
        """
        writer = self._open()
        if writer is None:
            return
        for key, value in metrics.items():
            x = to_float(value)
            if x is not None:
                writer.add_scalar(key, x, step)

    def histograms(self, step: int, groups: Mapping[str, Mapping[str, Any]]) -> None:
        """Write per-layer values as histograms.

        Each group (`param_norm`, `grad_norm`) gives one histogram of all its values
        (how the layers compare) and one per path (`param_norm/GPT.blocks.mlp.w_in`:
        one value per stacked layer).

        **Arguments:**

        - `step`: the optimizer step.
        - `groups`: `group -> {path: value or per-layer array}`, host numbers (see
            `layer_norms`).

        **Returns:**

        Nothing.
        """
        writer = self._open()
        if writer is None:
            return
        for group, values in groups.items():
            arrays = {p: np.ravel(np.asarray(v, np.float64)) for p, v in values.items()}
            if not arrays:
                continue
            writer.add_histogram(group, np.concatenate(list(arrays.values())), step)
            for path, array in arrays.items():
                writer.add_histogram(f"{group}/{path}", array, step)

    def close(self) -> None:
        """Flush and close the event file; calling it twice is harmless.

        **Returns:**

        Nothing.
        """
        if self._writer is not None and not self._closed:
            self._writer.close()
        self._closed = True
