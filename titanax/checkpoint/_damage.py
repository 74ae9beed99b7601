"""Damaged steps: what is wrong, in which file and which array, said plainly.

Three ways a finished step turns out damaged, each named with step, file and (when
known) array:

- its files are missing, truncated or fail their checksums (`_layout.check_files`,
  found before any array is read);
- Orbax/TensorStore fail while reading (the error names the chunk key, e.g.
  `"model.layers.0.weight/0.0"`; Orbax's own message embeds a `<bound method ...>`
  repr of the TensorStore, which is dropped);
- an array reads back but its values differ from the fingerprint saved with it.
"""

from __future__ import annotations

import gc
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from ._layout import FileProblem, LayoutError, array_extents, check_files

__all__ = [
    "DamagedStep",
    "clean_detail",
    "drain_orphaned_reads",
    "from_problem",
    "from_read_error",
    "from_mismatch",
]

_SUGGESTION = (
    "Restore another step (`ckpt.steps()` lists them; `step=None` takes the newest "
    "intact one), or delete the damaged step directory; `titanax checkpoint verify "
    "PATH` checks every step."
)
# TensorStore names the chunk it failed on: `Error reading "model.w/0.0" in OCDBT`.
_CHUNK_KEY = re.compile(r'reading "([^"]+)/[^"/]*" in OCDBT')
# Paths quoted in TensorStore errors, sometimes inside escaped JSON (`\\"/a/b\\"`).
_QUOTED_PATH = re.compile(r'"(/[^"\\]+)')
_REPR = re.compile(r"<[^<>]*>")


class DamagedStep(CheckpointError):
    """A finished step that cannot be read back intact.

    **Attributes:** `step`; `file` (the damaged file, or the step directory when
    unknown); `array` (the readable path of a damaged array, or None).
    """

    def __init__(
        self, message: str, *, step: int, file: Path, array: str | None = None
    ):
        super().__init__(message, path=str(file), suggestion=_SUGGESTION)
        self.step = step
        self.file = file
        self.array = array


def clean_detail(error: BaseException) -> str:
    """One line of an exception, without object reprs or TensorStore specs."""
    text = str(error).split("See full TensorStore details")[0].strip()
    text = text.splitlines()[0] if text else ""
    while _REPR.search(text):
        text = _REPR.sub("", text)
    return f"{type(error).__name__}: {text.strip()}"[:300]


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _readable(array: str | None, paths: Mapping[str, str]) -> str | None:
    if array is None:
        return None
    return paths.get(array, array)


def _message(step: int, file: Path, what: str, array: str | None, detail: str) -> str:
    holding = f", which holds `{array}`," if array else ""
    text = f"Checkpoint step {step} cannot be read: `{file}`{holding} {what}"
    return f"{text} ({detail})." if detail else f"{text}."


def from_problem(
    step: int, problem: FileProblem, paths: Mapping[str, str]
) -> DamagedStep:
    """A `DamagedStep` for a file `check_files` found damaged."""
    array = _readable(problem.array, paths)
    return DamagedStep(
        _message(step, problem.file, problem.what, array, ""),
        step=step,
        file=problem.file,
        array=array,
    )


def _data_file(step_dir: Path, array: str) -> Path | None:
    """The largest data file holding `array`'s chunks (None if unknown)."""
    try:
        extents = array_extents(step_dir).get(array, [])
    except LayoutError:
        return None
    if not extents:
        return None
    return max(extents, key=lambda e: e.length).file


def from_read_error(
    step: int, step_dir: Path, error: BaseException, paths: Mapping[str, str]
) -> DamagedStep:
    """A `DamagedStep` for a read that failed inside Orbax/TensorStore.

    **Arguments:**

    - `paths`: readable leaf paths by Orbax key (`model.layers.0.weight`).
    """
    problem = check_files(step_dir)
    if problem is not None:
        return from_problem(step, problem, paths)
    chain = _causes(error)
    array = None
    for cause in chain:
        found = _CHUNK_KEY.search(str(cause))
        if found:
            array = found.group(1)
            break
    # The most specific message: TensorStore's, deepest in the chain.
    detail = clean_detail(chain[-1])
    file = _data_file(step_dir, array) if array else None
    if file is None:
        for found in _QUOTED_PATH.findall(" ".join(str(c) for c in chain)):
            candidate = Path(found)
            if step_dir in candidate.parents and not candidate.is_dir():
                file = candidate
                break
    what = "could not be decoded" if file is not None else "could not be read"
    file = file or step_dir
    readable = _readable(array, paths)
    return DamagedStep(
        _message(step, file, what, readable, detail),
        step=step,
        file=file,
        array=readable,
    )


def from_mismatch(
    step: int,
    step_dir: Path,
    mismatched: list[tuple[str, str, str]],
    paths: Mapping[str, str],
) -> DamagedStep:
    """A `DamagedStep` for arrays whose values differ from their fingerprints.

    **Arguments:**

    - `mismatched`: `(orbax key, saved fingerprint, fingerprint read)` per array.
    """
    key, saved, read = mismatched[0]
    array = _readable(key, paths)
    file = _data_file(step_dir, key) or step_dir
    more = len(mismatched) - 1
    others = f"; {more} more array(s) differ too" if more > 0 else ""
    what = (
        f"does not match the fingerprint saved for it (read {read}, saved {saved}: "
        f"bit rot or an overwritten file){others}"
    )
    return DamagedStep(
        _message(step, file, what, array, ""), step=step, file=file, array=array
    )


def _is_orbax_read_noise(unraisable: Any) -> bool:
    text = f"{unraisable.exc_value!r} {unraisable.object!r}"
    return "Event loop is closed" in text or "_read_array_index" in text


def drain_orphaned_reads(quiet_s: float = 0.2, limit_s: float = 3.0) -> None:
    """Let the reads a failed Orbax restore left running finish, quietly.

    When one read of a restore fails, Orbax closes its event loop while the other
    reads are in flight; as they finish, each reports "Event loop is closed"
    through `sys.unraisablehook`: a wall of tracebacks after the error that
    already says what is wrong (errors under `pytest -W error`). Orbax offers no
    way to cancel or await them, so those reports, and only those, are dropped
    until none has come for `quiet_s` seconds (at most `limit_s`). Only a read
    that fails inside Orbax gets here: missing and truncated files are found
    before Orbax reads (`check_files`), bit rot after (fingerprints).
    """
    previous = sys.unraisablehook
    start = time.monotonic()
    last = [start]

    def hook(unraisable: Any) -> None:
        if _is_orbax_read_noise(unraisable):
            last[0] = time.monotonic()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        while True:
            gc.collect()
            now = time.monotonic()
            if now - last[0] >= quiet_s or now - start >= limit_s:
                break
            time.sleep(0.02)
    finally:
        sys.unraisablehook = previous
