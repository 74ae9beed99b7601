"""`TensorBoard`: scalars and the run header through tensorboardX."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .._errors import TrainerError
from ._base import _Closable
from ._console import format_header
from ._format import to_float


class TensorBoard(_Closable):
    """Writes each metric as a TensorBoard scalar and the header as text.

    Needs `tensorboardX` (`pip install titanax[tensorboard]`), imported only when a
    `TensorBoard` logger is created. View with `tensorboard --logdir <logdir>`.

    **Arguments:**

    - `logdir`: the folder for the event files.
    - `flush_secs`: how often the writer flushes to disk, in seconds; `close`
        flushes too.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, flush_secs: int = 30):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise TrainerError(
                "`TensorBoard` needs the `tensorboardX` package, which is not "
                "installed.",
                suggestion="pip install titanax[tensorboard]",
            ) from e
        self.logdir = os.fspath(logdir)
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)
        self._closed = False

    def header(self, info: Mapping[str, object]) -> None:
        """Write `info` as the text entry `run` at step 0, as `Basic` prints it.

        **Arguments:**

        - `info`: ordered entries.

        **Returns:**

        Nothing.
        """
        # Indented 4 spaces: a Markdown code block, so the columns stay aligned.
        text = "\n".join(f"    {line}" for line in format_header(info))
        self._writer.add_text("run", text, 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Add one scalar per numeric metric, tagged with its name.

        **Arguments:**

        - `step`: the optimizer step (the x axis).
        - `metrics`: host numbers by name; values that are not numbers are skipped.

        **Returns:**

        Nothing.
        """
        if self._closed:
            raise TrainerError(
                f"`TensorBoard({self.logdir!r})` was used after `close()`.",
                suggestion="Create a new `TensorBoard` logger.",
            )
        for key, value in metrics.items():
            x = to_float(value)
            if x is not None:
                self._writer.add_scalar(key, x, step)

    def close(self) -> None:
        """Flush and close the event file; calling it twice is harmless.

        **Returns:**

        Nothing.
        """
        if not self._closed:
            self._writer.close()
            self._closed = True
