"""Random-access data sources: token windows, text bytes, in-memory arrays.

A source is anything with `__len__` and `__getitem__(int)` (Grain's
`RandomAccessDataSource` protocol): the pipeline reads sample `i` of an epoch as
`source[i]`, in any order, from any process. Nothing here shuffles or batches; that
is the pipeline's job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DataError

__all__ = ["ArraySource", "ByteTokenizer", "TextWindows", "TokenWindows", "as_source"]


def _check_span(span: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 <= lo < hi <= 1.0:
        raise DataError(
            f"`span` expects two fractions 0 <= start < stop <= 1 of the token "
            f"stream, got {span!r}.",
            suggestion="Write e.g. `span=(0.0, 0.9)` for training and "
            "`span=(0.9, 1.0)` for validation.",
        )
    return lo, hi


def _check_positive(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DataError(
            f"`{name}` expects a positive int, got {value!r}.", suggestion=fix
        )
    return int(value)


class TokenWindows:
    """Fixed-length windows of a flat token array, as next-token training pairs.

    The tokens are a file of raw integers (nanoGPT's `train.bin`: `uint16` for
    vocabularies up to 65,536, `uint32` above), memory-mapped so that only the
    windows read are loaded, or a 1-D numpy array. Sample `i` starts at token
    `s = i * stride` of the span and is
    `{"x": tokens[s : s + window], "y": tokens[s + 1 : s + window + 1]}`, as `int32`.

    **Arguments:**

    - `tokens`: a path to a token file, or a 1-D integer numpy array.
    - `window`: tokens per sample (the context length `T`).
    - `dtype`: the file's integer dtype (`np.uint16` by default); ignored for arrays.
    - `stride`: tokens between consecutive window starts; default `window`
        (non-overlapping windows: every token is a target once per epoch). `1`
        gives every start position, as nanoGPT's random windows draw from.
    - `span`: the fractions `(start, stop)` of the token stream to use, e.g.
        `(0.0, 0.9)` for training and `(0.9, 1.0)` for validation.

    **Raises:** `DataError` for a file whose size is not a whole number of tokens,
    a window longer than the span, a missing file or a bad argument.

    !!! Example
        ```python
        train = tx.data.TokenWindows("train.bin", window=1024, dtype=np.uint16)
        train[0]["x"].shape  # (1024,)
        ```
    """

    def __init__(
        self,
        tokens: str | os.PathLike[str] | np.ndarray,
        window: int,
        *,
        dtype: Any = np.uint16,
        stride: int | None = None,
        span: tuple[float, float] = (0.0, 1.0),
    ):
        self.window = _check_positive(
            window, "window", "Use the model's context length, e.g. `window=256`."
        )
        self.stride = _check_positive(
            self.window if stride is None else stride,
            "stride",
            "Use `stride=window` (non-overlapping) or `stride=1` (every start).",
        )
        lo, hi = _check_span(span)
        self.path: Path | None = None
        self._array: np.ndarray | None = None
        if isinstance(tokens, np.ndarray):
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise DataError(
                    "`TokenWindows` expects a 1-D integer array of tokens, got an "
                    f"array of shape {tokens.shape} and dtype {tokens.dtype}.",
                    suggestion="Flatten the token ids into one 1-D integer array.",
                )
            self.dtype = tokens.dtype
            self._array = tokens
            total = len(tokens)
        else:
            self.path = Path(tokens)
            self.dtype = np.dtype(dtype)
            if not np.issubdtype(self.dtype, np.integer):
                raise DataError(
                    f"`TokenWindows(dtype=...)` expects an integer dtype, got "
                    f"{self.dtype}.",
                    suggestion="nanoGPT writes `np.uint16` (or `np.uint32` for "
                    "vocabularies over 65,536).",
                )
            if not self.path.is_file():
                raise DataError(
                    f"Expected a token file at `{self.path}`, found none.",
                    path=str(self.path),
                    suggestion="Check the path (relative paths start at the "
                    "current directory).",
                )
            size = self.path.stat().st_size
            if size % self.dtype.itemsize:
                raise DataError(
                    f"Expected a file of whole {self.dtype} tokens (a multiple of "
                    f"{self.dtype.itemsize} bytes), got {size} bytes at "
                    f"`{self.path}`.",
                    path=str(self.path),
                    suggestion="Pass the dtype the file was written with "
                    "(`dtype=np.uint16` or `np.uint32` for nanoGPT's .bin files, "
                    "`np.uint8` for bytes), or re-export the file.",
                )
            total = size // self.dtype.itemsize
        self.start = int(lo * total)
        self.stop = int(hi * total)
        self.num_tokens = self.stop - self.start
        if self.num_tokens < self.window + 1:
            where = f" at `{self.path}`" if self.path is not None else ""
            raise DataError(
                f"Expected at least window + 1 = {self.window + 1} tokens in the "
                f"span {span} for one window of {self.window}, got "
                f"{self.num_tokens}{where}.",
                path=None if self.path is None else str(self.path),
                suggestion=f"Use a `window` below {self.num_tokens} or more data.",
            )
        # (num_tokens - window - 1) // stride + 1 starts s with s + window + 1 <= n.
        self._len = (self.num_tokens - self.window - 1) // self.stride + 1

    def tokens(self) -> np.ndarray:
        """The whole token array (memory-mapped for a file, opened once per
        process: worker processes reopen the file instead of receiving a copy)."""
        if self._array is None:
            assert self.path is not None
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._array

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        s = self.start + index * self.stride
        chunk = np.asarray(self.tokens()[s : s + self.window + 1], dtype=np.int32)
        return {"x": chunk[:-1], "y": chunk[1:]}

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Windows `indices`, stacked: `{"x": (n, window), "y": (n, window)}` int32,
        read with one gather from the (memory-mapped) tokens."""
        starts = self.start + np.asarray(indices, np.int64) * self.stride
        offsets = np.arange(self.window + 1)
        chunk = self.tokens()[starts[:, None] + offsets].astype(np.int32)  # (n, T+1)
        return {
            "x": np.ascontiguousarray(chunk[:, :-1]),
            "y": np.ascontiguousarray(chunk[:, 1:]),
        }

    def __getstate__(self) -> dict[str, Any]:
        # Grain's worker processes receive the source: send the path, not the
        # (possibly many GB) mapped file.
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        return state

    def __repr__(self) -> str:
        what = str(self.path) if self.path is not None else "array"
        return (
            f"{type(self).__name__}({what}, window={self.window}, "
            f"stride={self.stride}, tokens={self.num_tokens}, windows={self._len})"
        )


class TextWindows(TokenWindows):
    """Windows of a text file's bytes: a byte-level tokenizer (vocabulary 256).

    The file is memory-mapped as `uint8`, so token `t` is byte `t` of the file
    (UTF-8 text stays UTF-8; `ByteTokenizer.decode` turns samples back into text).
    Samples are as in `TokenWindows`.

    **Arguments:**

    - `path`: a text file.
    - `window`, `stride`, `span`: as in `TokenWindows`.

    !!! Example
        ```python
        train = tx.data.TextWindows("input.txt", window=256, span=(0.0, 0.9))
        val = tx.data.TextWindows("input.txt", window=256, span=(0.9, 1.0))
        ```
    """

    vocab_size = 256

    def __init__(
        self,
        path: str | os.PathLike[str],
        window: int,
        *,
        stride: int | None = None,
        span: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(path, window, dtype=np.uint8, stride=stride, span=span)


class ByteTokenizer:
    """The byte-level tokenizer of `TextWindows`: UTF-8 bytes are the tokens.

    !!! Example
        ```python
        tok = tx.data.ByteTokenizer()
        tok.decode(tok.encode("héllo")) == "héllo"
        ```
    """

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as a `uint8` array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, tokens: Any) -> str:
        """Text from token ids (each taken modulo 256); invalid UTF-8 is replaced."""
        data = np.asarray(tokens).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class ArraySource:
    """In-memory arrays with a common leading dim: sample `i` is `{k: v[i]}`.

    **Arguments:**

    - `arrays`: a dict of numpy arrays (e.g. `{"x": images, "y": labels}`), all with
        the same leading (sample) dim.

    **Raises:** `DataError` for an empty dict, a scalar, or leading dims that differ.

    !!! Example
        ```python
        source = tx.data.ArraySource({"x": images, "y": labels})
        source[3]["x"].shape  # images.shape[1:]
        ```
    """

    def __init__(self, arrays: Mapping[str, Any]):
        if not isinstance(arrays, Mapping) or not arrays:
            raise DataError(
                "`ArraySource` expects a non-empty dict of arrays, got "
                f"{type(arrays).__name__}{'' if arrays else ' (empty)'}.",
                suggestion='Write e.g. `ArraySource({"x": images, "y": labels})`.',
            )
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        for key, n in lengths.items():
            if n is None:
                raise DataError(
                    f"`ArraySource` expects arrays with a leading sample dim, got a "
                    f"scalar at `{key}`.",
                    path=key,
                    suggestion="Give every array a leading dim of one entry per "
                    "sample.",
                )
        if len(set(lengths.values())) != 1:
            raise DataError(
                "`ArraySource` expects arrays with the same leading dim, got "
                + ", ".join(f"`{k}`: {n}" for k, n in lengths.items())
                + ".",
                suggestion="Give every array one entry per sample.",
            )
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return int(self._len or 0)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Samples `indices`, stacked: one numpy gather per array."""
        return {k: v[indices] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.arrays.items())
        return f"ArraySource({shapes})"


def as_source(data: Any) -> Any:
    """A random-access source from `data`: a dict of arrays becomes an
    `ArraySource`; anything with `__len__` and `__getitem__` is used as it is.

    **Raises:** `DataError` for an object without random access (a generator, a
    plain iterable) or an empty source.
    """
    source = ArraySource(data) if isinstance(data, Mapping) else data
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise DataError(
            "Expected a random-access source (an object with `__len__` and "
            f"`__getitem__(int)`), got {type(data).__name__}.",
            suggestion="Collect the samples into a list or a dict of numpy arrays, "
            "or write a class with `__len__` and `__getitem__` that reads sample i; "
            "a stream cannot be shuffled or resumed in O(1).",
        )
    if len(source) == 0:
        raise DataError(
            f"Expected a source with at least one sample, got an empty "
            f"{type(source).__name__}.",
            suggestion="Check the path, split or filter that produced the data.",
        )
    return source
