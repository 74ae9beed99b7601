"""The pipeline: a global, deterministic stream of samples, batched, read per process.

Sample `g` of the stream (the *global sample index*) is sample `g % N` of epoch
`g // N` of an `N`-sample source, in an order shuffled by `(seed, epoch)`
(`SampleOrder`). Global batch `b` after `start` holds samples
`[start + b B, start + (b + 1) B)`. Every process computes the same stream and reads
only its own rows of each batch (`process_rows`), so the global batch does not depend
on the process count or the data-parallel size, and a run resumes at any sample in
O(1): the position saved with a checkpoint is one integer, the global sample index.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from .._errors import DataError
from .._plan import Plan
from ._order import SampleOrder
from ._rows import check_batch_size, process_rows
from ._sources import as_source

__all__ = ["BatchIterator", "Pipeline"]

# Fields of `Pipeline.metadata()` that decide which sample sits at which index.
_ORDER_FIELDS = ("samples_per_epoch", "shuffle", "seed", "order", "source")


def _check_count(value: Any, name: str, fix: str, *, minimum: int = 1) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < minimum
    ):
        raise DataError(
            f"`{name}` expects an int >= {minimum}, got {value!r}.", suggestion=fix
        )
    return int(value)


def _read_samples(source: Any, indices: np.ndarray) -> Any:
    """Samples `indices` of `source`, stacked along a new leading dim: one call of
    the source's `read_batch` if it has one (a vectorised gather), else one
    `source[i]` per index."""
    read_batch = getattr(source, "read_batch", None)
    if read_batch is not None:
        return read_batch(indices)
    samples = [source[int(i)] for i in indices]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *samples)


def _allow_unparsed_absl_flags() -> None:
    """Grain 0.2.18's `mp_prefetch` reads an absl flag that raises in a program
    that never parsed absl flags (google/grain#1355, fixed after 0.2.18). Mark that
    one flag as given, at its default (no worker profiling), as Grain does for its
    own debug flags."""
    from absl import flags  # Grain's own dependency

    name = "grain_enable_multiprocess_worker_profiling"
    if name in flags.FLAGS and not flags.FLAGS.is_parsed():
        flags.FLAGS[name].present = True


class _BatchReader:
    """Element `i`: the given rows of global batch `i` after `start`, that is the
    global samples `start + i B + row`, each read as source sample `order[g]`.

    Past `end` (a finite stream's last, partial batch) rows are zeros, and with
    `mask_key` every batch gets a boolean mask of its real rows. A class, not a
    closure, so that Grain can send it to worker processes.
    """

    def __init__(
        self,
        order: SampleOrder,
        source: Any,
        start: int,
        batch_size: int,
        rows: Sequence[int],
        end: int | None,
        mask_key: str | None,
    ):
        self.order, self.source = order, source
        self.start, self.batch_size, self.rows = start, batch_size, tuple(rows)
        self.end, self.mask_key = end, mask_key

    def __call__(self, i: int) -> Any:
        first = self.start + i * self.batch_size
        samples = [first + row for row in self.rows]  # ascending: rows are sorted
        if self.end is not None:
            samples = [g for g in samples if g < self.end]
        indices = self.order.indices(np.array(samples, np.int64))
        if self.mask_key is None:
            return _read_samples(self.source, indices)
        return self._padded(indices)

    def _padded(self, indices: np.ndarray) -> dict[str, Any]:
        assert self.mask_key is not None
        real = len(indices)
        # A process whose rows are all padding still needs the leaves' shapes.
        shape_of = indices if real else np.zeros(1, np.int64)
        batch = _read_samples(self.source, shape_of)
        if not isinstance(batch, Mapping):
            raise DataError(
                f"`drop_last=False` pads the last batch and adds a `{self.mask_key}` "
                f"entry: expected dict samples, got {type(batch).__name__}.",
                suggestion="Return dicts from the source, or keep `drop_last=True`.",
            )
        if self.mask_key in batch:
            raise DataError(
                f"Expected samples without a `{self.mask_key}` entry (the padding "
                f"mask), got keys {sorted(batch)}.",
                suggestion="Pass another `mask_key=` to the pipeline.",
            )
        k = len(self.rows)
        out = {}
        for key, value in batch.items():
            value = np.asarray(value)
            padded = np.zeros((k, *value.shape[1:]), value.dtype)  # (k, ...)
            padded[:real] = value[:real]
            out[key] = padded
        out[self.mask_key] = np.arange(k) < real
        return out


class BatchIterator(Iterator[Any]):
    """This process's rows of each global batch, from a global sample index on.

    Returned by `Pipeline.batches`. `position` is the global sample index of the
    next batch it yields: save it (it is `TrainState.data_position` after the
    batches consumed) and pass it back to `Pipeline.batches` to resume.
    """

    def __init__(self, iterator: Any, position: int, batch_size: int):
        self._iterator = iterator
        self.position = position
        self._batch_size = batch_size

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self.position += self._batch_size
        return batch

    def get_state(self) -> dict[str, int]:
        """The position as JSON-serialisable state: `{"position": sample index}`."""
        return {"position": self.position}

    def close(self) -> None:
        """Stop Grain's prefetch threads or processes."""
        self._iterator.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pipeline:
    """A deterministic, sharded, resumable stream of global batches, on Grain.

    Sample `g` is source sample `g % N` of epoch `g // N`, shuffled by
    `(seed, epoch)`; global batch `b` (from sample 0) holds samples
    `[b B, (b + 1) B)`, whatever the number of processes or the data-parallel size.
    Each process reads only its rows of each batch (`batches(start, plan, mesh)`).
    The Trainer consumes it through `global_batch_size` and `batches`.

    **Arguments:**

    - `source`: a random-access source (`__len__` and `__getitem__(int)`:
        `TokenWindows`, `TextWindows`, `ArraySource`, your own class, a list), or a
        dict of arrays with a common leading dim (wrapped in an `ArraySource`).
        A source may also define `read_batch(indices) -> batch` to read many
        samples in one call (`ArraySource` and `TokenWindows` gather them with one
        numpy index); otherwise samples are read one by one and stacked.
    - `batch_size`: the global batch size `B` (rows over all processes).
    - `shuffle`: shuffle each epoch globally: from 2**16 samples up, Grain's
        `MapDataset.shuffle` (O(1) per index, epoch `e` seeded by `seed + e`);
        below, a numpy permutation per epoch (Grain's cipher is slow on small
        epochs; see `titanax/data/_order.py`).
    - `seed`: the shuffle seed, in `[0, 2**32)`.
    - `epochs`: passes over the source; `None` (default) streams forever.
    - `drop_last`: with finite `epochs`, drop the last global batch if partial.
        `False` pads it to `B` rows of zeros and adds a boolean `mask_key` leaf
        (`True` for real rows) to every batch (elements must then be dicts).
    - `mask_key`: the name of that mask leaf.
    - `num_threads`: threads reading batches ahead (0: read on demand).
    - `prefetch`: batches read ahead per process (0: none).
    - `num_workers`: worker processes (Grain's `mp_prefetch`) reading batches; 0
        (default) reads in this process. Sources are sent to them by Grain.

    **Raises:** `DataError` for an empty or non-random-access source, a bad batch
    size, seed or count, or a finite stream shorter than one batch.

    !!! Example
        ```python
        data = tx.data.Pipeline({"x": images, "y": labels}, batch_size=64, seed=0)
        trainer.fit(data, steps=1_000)          # the Trainer reads data.batches
        for batch in data.batches(6_400, plan, mesh):  # resume at sample 6,400
            ...
        ```
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = None,
        drop_last: bool = True,
        mask_key: str = "mask",
        num_threads: int = 2,
        prefetch: int = 4,
        num_workers: int = 0,
    ):
        self.source = as_source(source)
        self.global_batch_size = _check_count(
            batch_size, "batch_size", "Use the global batch size, e.g. 64."
        )
        self.seed = _check_count(
            seed, "seed", "Use a seed in [0, 2**32), e.g. 0.", minimum=0
        )
        if self.seed >= 2**32:
            raise DataError(
                f"`seed` expects an int in [0, 2**32), got {seed}.",
                suggestion="Use e.g. `seed % 2**32`.",
            )
        self.epochs = (
            None
            if epochs is None
            else _check_count(
                epochs, "epochs", "Use None to stream forever, or a pass count."
            )
        )
        self.shuffle, self.drop_last, self.mask_key = bool(shuffle), drop_last, mask_key
        self.num_threads = _check_count(
            num_threads, "num_threads", "Use 0 to read on demand.", minimum=0
        )
        self.prefetch = _check_count(
            prefetch, "prefetch", "Use 0 for no read-ahead.", minimum=0
        )
        self.num_workers = _check_count(
            num_workers, "num_workers", "Use 0 for no worker process.", minimum=0
        )
        self.samples_per_epoch = len(self.source)
        self.num_samples: int | None = (
            None if self.epochs is None else self.epochs * self.samples_per_epoch
        )
        if self.num_batches() == 0:
            raise DataError(
                f"Expected at least one batch of {self.global_batch_size} samples "
                f"with drop_last=True, got {self.num_samples} samples "
                f"({self.epochs} epoch(s) of {self.samples_per_epoch}).",
                suggestion="Use a smaller batch size, more epochs, or "
                "`drop_last=False` (pads the last batch and adds a mask).",
            )
        # Indices, not samples, go through the order: Grain's per-record path
        # costs tens of microseconds a sample, where a source's `read_batch`
        # gathers a whole batch at once (benchmarks/data.py).
        self._order = SampleOrder(
            self.samples_per_epoch, shuffle=self.shuffle, seed=self.seed
        )

    # --- the global stream ----------------------------------------------------------

    @property
    def pads(self) -> bool:
        """Whether batches carry a mask leaf (`drop_last=False` on a finite stream)."""
        return not self.drop_last and self.num_samples is not None

    def sample(self, index: int) -> Any:
        """Global sample `index` of the stream (no mask)."""
        index = self._check_start(index, "index", inclusive=False)
        return self.source[self._order[index]]

    def num_batches(self, start: int = 0) -> int | None:
        """Global batches the stream yields from sample `start`; `None` if infinite."""
        if self.num_samples is None:
            return None
        left = max(self.num_samples - start, 0)
        batch = self.global_batch_size
        return left // batch if self.drop_last else -(-left // batch)

    def global_batch(self, start: int = 0) -> Any:
        """The whole global batch of samples `[start, start + B)`, read here and now
        (for tests, evaluation and one-process use).

        **Raises:** `DataError` if no batch starts at `start` (past a finite end).
        """
        dataset = self._local_dataset(start, range(self.global_batch_size))
        if len(dataset) == 0:
            raise DataError(
                f"Expected a start with a batch after it, got sample {start} of a "
                f"{self.num_samples}-sample stream.",
                suggestion="Use a start below the end of the stream.",
            )
        return dataset[0]

    def rows(
        self, plan: Plan, mesh: Mesh, devices: Collection[Any] | None = None
    ) -> np.ndarray:
        """This process's rows of each global batch (see `process_rows`)."""
        return process_rows(self.global_batch_size, plan, mesh, devices)

    def batches(
        self,
        start: int = 0,
        plan: Plan | None = None,
        mesh: Mesh | None = None,
        *,
        devices: Collection[Any] | None = None,
        accumulate: bool = True,
    ) -> BatchIterator:
        """This process's rows of each global batch, from global sample `start`.

        Batch `i` covers samples `[start + i B, start + (i + 1) B)`; its rows are
        the ones `process_rows` gives for this process, so that
        `jax.make_array_from_process_local_data(NamedSharding(mesh,
        plan.batch_spec(ndim)), rows)` is exactly the global batch. Starting costs
        O(1): nothing before `start` is read.

        **Arguments:**

        - `start`: the global sample index to start at (a checkpoint's
            `data_position`).
        - `plan`, `mesh`: the layout; both `None` (default) yields whole global
            batches.
        - `devices`: the process's devices (default: this process's devices of
            `mesh`); see `process_rows`.
        - `accumulate`: require `B` to split into `plan.accumulate_steps`
            microbatches per data shard as well (a training stream).

        **Returns:** a `BatchIterator` (with `.position`, `.get_state()`,
        `.close()`).

        **Raises:** `DataError` for a batch size the data axes do not divide, a
        negative start or one past a finite stream's end.
        """
        start = self._check_start(start, "start", inclusive=True)
        if (plan is None) != (mesh is None):
            raise DataError(
                "`batches` expects both `plan` and `mesh` (this process's rows) or "
                f"neither (whole batches), got plan={plan!r} and mesh={mesh!r}.",
                suggestion="Pass `batches(start, plan, mesh)`.",
            )
        if plan is None or mesh is None:
            rows: Sequence[int] = range(self.global_batch_size)
        else:
            check_batch_size(self.global_batch_size, plan, mesh, accumulate=accumulate)
            rows = process_rows(self.global_batch_size, plan, mesh, devices).tolist()
        dataset = self._local_dataset(start, rows).to_iter_dataset(
            grain.ReadOptions(
                num_threads=self.num_threads, prefetch_buffer_size=self.prefetch
            )
        )
        if self.num_workers:
            _allow_unparsed_absl_flags()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers)
            )
        return BatchIterator(iter(dataset), start, self.global_batch_size)

    def __iter__(self) -> Iterator[Any]:
        """Whole global batches from sample 0: for one process only.

        **Raises:** `DataError` when several processes run (each would read every
        row); use `batches(start, plan, mesh)` there.
        """
        if jax.process_count() > 1:
            raise DataError(
                "Iterating a `Pipeline` yields whole global batches, expected in "
                f"one process, got {jax.process_count()} processes.",
                suggestion="Pass the pipeline to `Trainer.fit`, or iterate "
                "`pipeline.batches(start, plan, mesh)` for this process's rows.",
            )
        return self.batches(0)

    # --- checkpoints ----------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """A JSON-serialisable description of the stream, to save next to the
        position (checkpoint metadata) and compare on resume (`check_resume`)."""
        return {
            "source": type(self.source).__name__,
            "samples_per_epoch": self.samples_per_epoch,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epochs": self.epochs,
            "global_batch_size": self.global_batch_size,
            "drop_last": self.drop_last,
            "order": self._order.kind,
        }

    def check_resume(self, saved: Mapping[str, Any]) -> None:
        """Warn if `saved` (an earlier `metadata()`) describes another sample order:
        resuming at a saved position would then not continue the saved stream.
        A different batch size or epoch count is fine (positions count samples)."""
        now = self.metadata()
        changed = [k for k in _ORDER_FIELDS if k in saved and saved[k] != now[k]]
        if changed:
            detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            warnings.warn(
                f"Resuming a data stream whose order changed ({detail}); the saved "
                "position points at different samples now.",
                stacklevel=2,
            )

    # --- internals ------------------------------------------------------------------

    def _check_start(self, value: Any, name: str, *, inclusive: bool) -> int:
        value = _check_count(value, name, "Use a global sample index >= 0.", minimum=0)
        end = self.num_samples
        if end is not None and (value > end or (value == end and not inclusive)):
            raise DataError(
                f"Expected `{name}` at most {end} (the stream's {self.epochs} "
                f"epoch(s) of {self.samples_per_epoch} samples), got {value}.",
                suggestion="Resume with the pipeline the position was saved with, "
                "or raise `epochs`.",
            )
        return value

    def _local_dataset(self, start: int, rows: Sequence[int]) -> grain.MapDataset:
        """Element `i`: the given rows of global batch `i` after `start`."""
        count = self.num_batches(start)
        reader = _BatchReader(
            self._order,
            self.source,
            start,
            self.global_batch_size,
            rows,
            self.num_samples,
            self.mask_key if self.pads else None,
        )
        return grain.MapDataset.range(sys.maxsize if count is None else count).map(
            reader
        )

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.source!r}, batch_size={self.global_batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, epochs={self.epochs})"
        )
