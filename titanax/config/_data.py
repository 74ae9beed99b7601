"""Batches for `titanax train`: the `data:` section → a pipeline.

`make_data` is the one place a config becomes data. A pipeline here has the shape
the Trainer recognises (`global_batch_size` and `batches(start, plan, mesh)`, this
process's rows of each global batch from global sample `start`), so switching to
`titanax.data` later changes only `make_data`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .._errors import ConfigError
from .._plan import Plan
from ._imports import resolve
from ._schema import DataConfig

__all__ = ["Batches", "Windows", "make_data", "process_rows", "stdlib_text"]

# Bytes of standard-library source used when a text source has no `path`.
STDLIB_CAP = 1 << 20


def stdlib_text(cap: int = STDLIB_CAP) -> bytes:
    """The first `cap` bytes of the standard library's top-level `.py` files, in
    sorted order: the same corpus on every machine with this Python."""
    folder = Path(os.__file__).resolve().parent
    chunks, size = [], 0
    for path in sorted(folder.glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


def process_rows(global_batch_size: int, plan: Plan, mesh: Mesh) -> slice:
    """The rows of a global batch that this process's devices hold.

    **Arguments:**

    - `global_batch_size`: rows per global batch.
    - `plan`, `mesh`: the batch is split over `plan.data_axes`.

    **Returns:** a `slice` (all rows on one process, or when no data axis spans
    processes).
    """
    sharding = NamedSharding(mesh, plan.batch_spec(1))
    indices = sharding.addressable_devices_indices_map((global_batch_size,))
    spans = set()
    for index in indices.values():
        rows = range(global_batch_size)[index[0] if index else slice(None)]
        spans.add((rows.start, rows.stop))
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if covered != hi - lo:  # pragma: no cover - make_mesh keeps a process contiguous
        raise ConfigError(
            f"Expected this process's rows of the batch to be contiguous, got {spans}.",
            suggestion="Build the mesh with `tx.make_mesh` (process-major order).",
        )
    return slice(lo, hi)


class Windows:
    """Random contiguous windows of a token array: `x = tokens[i:i+T]`, `y` the
    next tokens (nanoGPT's `get_batch`). Batch `b` draws its offsets from
    `default_rng([seed, b])`, so any batch is reproducible from its index alone
    (an O(1) resume) and every process draws the same global batch.

    **Arguments:**

    - `tokens`: a 1-D integer array (bytes of a text, or token ids).
    - `batch_size`: global rows per batch.
    - `seq_len`: tokens per row (`T`).
    - `seed`: the offsets' seed.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ConfigError(
                f"Expected at least {seq_len + 2} tokens for windows of "
                f"`data.seq_len`={seq_len}, got {len(tokens)}.",
                path="data.path",
                suggestion="Use a longer file, or a smaller `data.seq_len`.",
            )
        self.tokens = tokens
        self.global_batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def global_batch(self, index: int) -> dict[str, np.ndarray]:
        """Global batch number `index`: `{"x": (B, T), "y": (B, T)}` int32."""
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(
            0, len(self.tokens) - self.seq_len - 1, self.global_batch_size
        )
        rows = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T + 1)
        window = self.tokens[rows].astype(np.int32)
        return {"x": window[:, :-1], "y": window[:, 1:]}

    def batches(self, start: int, plan: Plan, mesh: Mesh) -> Iterator[Any]:
        """This process's rows of every global batch from global sample `start`."""
        rows = process_rows(self.global_batch_size, plan, mesh)
        index = start // self.global_batch_size
        while True:
            batch = self.global_batch(index)
            yield {k: v[rows] for k, v in batch.items()}
            index += 1


class Batches:
    """Global batches from a function (`data.source: function`), sliced to this
    process's rows; a resume skips `start // batch_size` batches.

    **Arguments:**

    - `make`: `() -> Iterable` of global batches.
    - `batch_size`: their rows.
    """

    def __init__(self, make: Callable[[], Iterable[Any]], batch_size: int):
        self.make = make
        self.global_batch_size = batch_size

    def batches(self, start: int, plan: Plan, mesh: Mesh) -> Iterator[Any]:
        """This process's rows of every global batch from global sample `start`."""
        rows = process_rows(self.global_batch_size, plan, mesh)
        skip = start // self.global_batch_size
        for batch in self.make():
            if skip:
                skip -= 1
                continue
            yield jax.tree.map(lambda x: np.asarray(x)[rows], batch)


def _file(path: str, where: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"Expected a file at `{where}`, found nothing at `{file.absolute()}`.",
            path=where,
            suggestion="Check the path (relative paths start at the current folder).",
        )
    return file


def make_data(config: DataConfig, seq_len: int | None) -> Windows | Batches:
    """The data pipeline a `data:` section describes.

    **Arguments:**

    - `config`: the section.
    - `seq_len`: the model's context length, used when `config.seq_len` is unset.

    **Returns:** a pipeline with `global_batch_size` and `batches(start, plan,
    mesh)`.

    **Raises:** `ConfigError` for a missing file, an unknown dtype, or no sequence
    length.
    """
    if config.source == "function":
        assert config.function is not None  # checked by load_config
        fn = resolve(config.function, "data.function")
        kwargs = dict(config.kwargs)
        return Batches(
            lambda: fn(batch_size=config.batch_size, seed=config.seed, **kwargs),
            config.batch_size,
        )
    length = config.seq_len or seq_len
    if length is None:
        raise ConfigError(
            "Expected `data.seq_len` (tokens per sample), got none, and the model "
            "has no `config.block_size` to default to.",
            path="data.seq_len",
            suggestion="Set `data.seq_len: 64`.",
        )
    if config.source == "text":
        raw = (
            stdlib_text()
            if config.path is None
            else _file(config.path, "data.path").read_bytes()
        )
        tokens = np.frombuffer(raw, dtype=np.uint8)
    else:
        assert config.path is not None  # checked by load_config
        try:
            dtype = np.dtype(config.dtype)
        except TypeError as e:
            raise ConfigError(
                f"Expected a numpy integer dtype at `data.dtype`, got "
                f"{config.dtype!r}.",
                path="data.dtype",
                suggestion="Use `uint16` (GPT-2 token ids) or `uint32`.",
            ) from e
        tokens = np.memmap(_file(config.path, "data.path"), dtype=dtype, mode="r")
    return Windows(np.asarray(tokens), config.batch_size, length, config.seed)
