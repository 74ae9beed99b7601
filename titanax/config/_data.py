"""The `data:` section → a `titanax.data.Pipeline`.

`make_data` is the one place a config becomes data: it picks the source
(`TextWindows`, `TokenWindows`, or what an import path returns) and wraps it in a
`Pipeline`, which does the rest (shuffling, batching, each process's rows, the O(1)
resume at `TrainState.data_position`). Errors of the data package come back as
`ConfigError`s naming the config key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, DataError
from ..data import Pipeline, TextWindows, TokenWindows, as_source
from ._imports import resolve
from ._schema import DataConfig

__all__ = ["make_data", "stdlib_text"]

# Bytes of standard-library source used when a text source has no `path`.
STDLIB_CAP = 1 << 20


def stdlib_text(cap: int = STDLIB_CAP) -> bytes:
    """A text corpus every machine has: the Python standard library's own source.

    The top-level `.py` files next to `os.py`, concatenated in sorted file-name
    order and cut at `cap` bytes: the same bytes on every run with this Python.
    It is what a `text` data source without `path` trains on (and
    `examples/gpt/train.py` without `--text`).

    **Arguments:**

    - `cap`: the number of bytes (default 1 MiB).

    **Returns:** the corpus as `bytes` (at most `cap`).

    !!! Example

        ```python
        tokens = np.frombuffer(tx.config.stdlib_text(), dtype=np.uint8)
        train = tx.data.TokenWindows(tokens, 256, span=(0.0, 0.9))
        ```
    """
    folder = Path(os.__file__).resolve().parent
    chunks, size = [], 0
    for path in sorted(folder.glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


def _from_data(error: DataError, where: str) -> ConfigError:
    return ConfigError(
        f"{error.message} (from `{where}`)", path=where, suggestion=error.suggestion
    )


def _token_dtype(name: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise ConfigError(
            f"Expected a numpy integer dtype at `data.dtype`, got {name!r}.",
            path="data.dtype",
            suggestion="Use `uint16` (GPT-2 token ids) or `uint32`.",
        )
    return dtype


def _windows(config: DataConfig, seq_len: int | None) -> TokenWindows:
    """`TextWindows` / `TokenWindows` of `seq_len` tokens (the model's context
    length unless `data.seq_len` is set)."""
    window = config.seq_len or seq_len
    if window is None:
        raise ConfigError(
            "Expected `data.seq_len` (tokens per sample), got none, and the model "
            "has no `config.block_size` to default to.",
            path="data.seq_len",
            suggestion="Set `data.seq_len: 64`.",
        )
    try:
        if config.source == "tokens":
            assert config.path is not None  # checked by load_config
            dtype = _token_dtype(config.dtype)
            return TokenWindows(config.path, window, dtype=dtype, stride=config.stride)
        if config.path is not None:
            return TextWindows(config.path, window, stride=config.stride)
        corpus = np.frombuffer(stdlib_text(), dtype=np.uint8)  # (bytes,)
        return TokenWindows(corpus, window, stride=config.stride)
    except DataError as e:
        # A missing file, a size that is not whole tokens, or a file shorter than
        # one window: each is about the file.
        raise _from_data(e, "data.path") from None


def _function_source(config: DataConfig) -> Any:
    """What `data.function` returns, as a random-access source."""
    assert config.function is not None  # checked by load_config
    fn = resolve(config.function, "data.function")
    try:
        samples = fn(**config.kwargs)
    except TypeError as e:
        raise ConfigError(
            f"Expected `data.kwargs` to be the keyword arguments of "
            f"`{config.function}`, got {type(e).__name__}: {e}",
            path="data.kwargs",
            suggestion="Check the keyword names against the function's signature.",
        ) from e
    try:
        return as_source(samples)
    except DataError as e:
        raise _from_data(e, "data.function") from None


def make_data(config: DataConfig, seq_len: int | None = None) -> Pipeline:
    """The pipeline a `data:` section describes.

    **Arguments:**

    - `config`: the section.
    - `seq_len`: the model's context length, the window of `text` and `tokens`
        when `config.seq_len` is unset.

    **Returns:** a `tx.data.Pipeline` (pass it to `Trainer.fit`, which starts it at
    the state's `data_position`).

    **Raises:** `ConfigError` naming the key: a missing or malformed file, a window
    longer than the data, an unknown dtype, no sequence length, a function that does
    not return a random-access source.

    !!! Example

        ```python
        config = tx.config.load_config("run.yaml")
        data = tx.config.make_data(config.data, seq_len=256)
        data.global_batch(0)["x"].shape  # (config.data.batch_size, 256)
        ```
    """
    if config.source == "function":
        source = _function_source(config)
    else:
        source = _windows(config, seq_len)
    try:
        return Pipeline(
            source,
            config.batch_size,
            shuffle=config.shuffle,
            seed=config.seed,
            epochs=config.epochs,
            num_workers=config.num_workers,
        )
    except DataError as e:
        raise _from_data(e, "data") from None
