"""`tx.Trainer`: a thin loop over `make_train_step`.

The loop never blocks the host on a step: the step is dispatched asynchronously, the
next batch is read and checked while it runs and copied to the devices by the next
dispatch (so, in the steady state, also while it runs), and metrics are fetched only
at log steps.

The contract of `fit`, in one place:

- `steps` is a total: `fit` trains until `state.step == steps`, so re-running the
    same command after a crash or a preemption (with `resume=True`) ends where an
    uninterrupted run ends.
- Every batch is checked (structure, shapes, dtypes, rows) before the state is
    donated to the step: a bad batch never costs the state. `trainer.state` is always
    a usable state after `fit` returns or raises (or `None` if a step failed after
    its state was donated: then resume from the last checkpoint).
- `fit` says why it stopped: it returns (`trainer.stop_reason` is `"finished"` or
    `"data_exhausted"`, the latter with a `DataExhaustedWarning`, or
    `DataExhaustedError` under `strict=True`), or raises `tx.Preempted` after saving
    (SIGTERM), or re-raises `KeyboardInterrupt` after saving.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from .._checks import (
    describe_value,
    expect_bool,
    expect_choice,
    expect_int,
    expect_mesh,
    expect_number,
    expect_path_or_bool,
    expect_plan,
    expect_sequence_of,
)
from .._errors import (
    ArgumentError,
    BatchError,
    DataExhaustedError,
    DataExhaustedWarning,
    NonFiniteError,
    Preempted,
    SkippedStepsWarning,
    StepFailedError,
    TitanaxError,
)
from .._explain import Explanation, bytes_per_device, explain
from .._flops import step_flops
from .._mesh import make_mesh
from .._plan import Plan
from .._sharding import check_model_factory
from ..checkpoint import OrbaxCheckpoint, PreemptionGuard
from ..loggers import (
    Basic,
    Logger,
    Meter,
    Profile,
    Progress,
    emit,
    layer_norms,
    peak_flops_per_device,
    run_header,
)
from ..parallel.pipeline import Stage
from ._batch import ShortBatch
from ._precision import Precision
from ._state import TrainState
from ._step import CompiledStep, LossFn, Trainable, TrainStep

__all__ = ["Hook", "Trainer"]

Hook = Callable[[int, dict[str, float], "Trainer"], None]
StopReason = Literal["finished", "data_exhausted", "preempted", "interrupted", "failed"]


def _default_mesh(plan: Plan) -> Mesh:
    axes = plan.mesh_axes
    if not axes:
        return make_mesh(jax.devices()[:1], replica=1)
    if len(axes) == 1:
        return make_mesh(None, **{axes[0]: -1})
    raise ArgumentError(
        f"Expected `Trainer(mesh=...)` for a plan over several mesh axes {axes}, got "
        "None: Titanax will not guess their sizes.",
        suggestion=(
            "Pass `mesh=tx.make_mesh(" + ", ".join(f"{a}=..." for a in axes) + ")`."
        ),
    )


def _is_logger(x: Any) -> bool:
    return all(callable(getattr(x, name, None)) for name in ("header", "log"))


def _is_checkpoint(x: Any) -> bool:
    names = ("save", "should_save", "restore", "latest_step", "wait")
    return all(callable(getattr(x, name, None)) for name in names)


def _is_pipeline(data: Any) -> bool:
    """A `titanax.data` pipeline: it resumes at a sample, in O(1)."""
    return callable(getattr(data, "batches", None)) and isinstance(
        getattr(data, "global_batch_size", None), int
    )


def _check_data(data: Any) -> None:
    if _is_pipeline(data):
        return
    if isinstance(data, Mapping | np.ndarray | jax.Array | str | bytes) or not (
        isinstance(data, Iterable)
    ):
        one = isinstance(data, Mapping | np.ndarray | jax.Array)
        raise ArgumentError(
            f"`fit(data=...)` expected an iterable of batches (or a `titanax.data` "
            f"pipeline), got {describe_value(data)}"
            + (": that looks like one batch." if one else "."),
            suggestion=(
                "Pass a list or generator of batches, e.g. `fit([batch], steps=10)` or "
                "`fit(tx.data.Loader(...))`."
            ),
        )


class Trainer:
    """Train an Equinox model under a plan: `tx.Trainer(model, plan, ...).fit(data)`.

    **Arguments:**

    - `model`: an `eqx.Module`, or a `key -> eqx.Module` function (the model is then
        created directly sharded, see `tx.init`).
    - `plan`: the `tx.Plan`.
    - `optimizer`: an Optax transformation, e.g. `tx.optim.adamw(1e-3, ...)`.
    - `loss`: `loss(model, batch, key) -> loss | (loss, metrics_dict)`.
    - `mesh`: the device mesh; by default, all devices along the plan's single axis.
    - `trainable`: which arrays train (`None`: all; an Equinox filter spec; or
        `(path, leaf) -> bool`).
    - `precision`: `tx.Precision.fp32()` (default), `.bf16()` or `.fp16()`.
    - `checkpoint`: a `tx.OrbaxCheckpoint`, saved every `checkpoint.every` steps, at
        the end, on `KeyboardInterrupt`, on SIGTERM, and before a data error
        propagates.
    - `loggers`: `tx.loggers.Basic()`, `CSV(...)`, `TensorBoard(...)`, ...
    - `log_every`: fetch and log metrics every this many steps.
    - `seed`: the run's PRNG seed (model init and step keys).
    - `continue_on_error`: `False` (default): a failing step or a bad batch raises
        (`StepFailedError`, `BatchError`) with the state intact. `True`: warn, skip
        the batch (its rows still count in `data_position`) and go on; more than
        `max_consecutive_failures` failures in a row raise `StepFailedError` naming
        the first of them.
    - `max_consecutive_failures`: the bound for `continue_on_error` (default 10).
    - `on_nonfinite`: `"raise"` (default) raises `NonFiniteError` at the next log
        step or checkpoint, naming the first step whose loss or gradients were not
        finite; no checkpoint is saved after it (`trainer.state` holds its
        non-finite update: resume from the last checkpoint). `"skip"` skips such
        steps on device (the state is kept, at the cost of a select per step), warns
        (`SkippedStepsWarning`), shows the count as `skipped` in the log line, and
        raises `NonFiniteError` once more than `max_consecutive_skips` steps in a row
        were skipped (checked at log steps and before saving).
    - `max_consecutive_skips`: the bound for `on_nonfinite="skip"` (default 20).
    - `hooks`: callables `hook(step, metrics, trainer)` run at each log step, with
        `trainer.state` current (so a hook may call `trainer.evaluate(...)`).
    - `tokens_per_sample`: for the meter's tokens/s.
    - `flops_per_step`: model FLOPs of one step over all devices, for MFU; by default
        XLA's cost analysis of the compiled step (which counts what actually runs,
        rematerialisation and optimizer included).
    - `peak_flops_per_device`: the peak FLOP/s of one device, for MFU; by default
        from `tx.loggers.peak_flops_per_device` (known GPUs and TPUs; none on CPU,
        where MFU is then not shown).
    - `mode`: `"jit"` (default) or `"spmd"`: the loss runs per device on its batch
        shard and may call `tx.collectives` (DP plans; see `tx.make_train_step`).
    - `stage`: a `tx.Stage`, required with a `PP` plan (see `tx.make_train_step`).

    Every argument is checked here, before anything is placed or compiled
    (`ArgumentError`, `PlanError`, ...).

    **Attributes:** `state` (the current `TrainState`, or `None` before the first
    `fit`/`init_state`), `stop_reason` (why the last `fit` stopped).

    !!! Example
        ```python
        trainer = tx.Trainer(model, tx.Plan(dp=tx.DP()), optimizer=tx.optim.adamw(1e-3),
                             loss=loss_fn, loggers=[tx.loggers.Basic()])
        state = trainer.fit(batches, steps=100)
        ```
    """

    def __init__(
        self,
        model: Any,
        plan: Plan,
        *,
        optimizer: optax.GradientTransformation,
        loss: LossFn,
        mesh: Mesh | None = None,
        trainable: Trainable | None = None,
        precision: Precision | None = None,
        checkpoint: Any = None,
        loggers: Sequence[Logger] | None = None,
        log_every: int = 10,
        seed: int = 0,
        continue_on_error: bool = False,
        max_consecutive_failures: int = 10,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        max_consecutive_skips: int = 20,
        hooks: Sequence[Hook] = (),
        tokens_per_sample: int | None = None,
        flops_per_step: float | None = None,
        peak_flops_per_device: float | None = None,
        mode: Literal["jit", "spmd"] = "jit",
        stage: Stage | None = None,
        histograms_every: int | None = None,
        profile: Profile | None = None,
    ):
        if not isinstance(model, eqx.Module) or isinstance(model, eqx.Partial):
            check_model_factory(model)
        expect_plan(plan, "Trainer(plan=...)")
        expect_mesh(mesh, "Trainer(mesh=...)", optional=True)
        if checkpoint is not None and not _is_checkpoint(checkpoint):
            raise ArgumentError(
                f"`Trainer(checkpoint=...)` expected a `tx.OrbaxCheckpoint` or None, "
                f"got {describe_value(checkpoint)}.",
                suggestion="Pass `checkpoint=tx.OrbaxCheckpoint(path, every=100)`.",
            )
        self.loggers = expect_sequence_of(
            default_loggers() if loggers is None else loggers,
            "Trainer(loggers=...)",
            _is_logger,
            "loggers (objects with `header` and `log` methods)",
            "loggers=[tx.loggers.Basic()]",
        )
        self.hooks = expect_sequence_of(
            hooks,
            "Trainer(hooks=...)",
            callable,
            "functions `hook(step, metrics, trainer)`",
            "hooks=[lambda step, metrics, trainer: print(step)]",
        )
        self.log_every = expect_int(log_every, "Trainer(log_every=...)", minimum=1)
        self.seed = expect_int(seed, "Trainer(seed=...)", minimum=0)
        self.continue_on_error = expect_bool(
            continue_on_error, "Trainer(continue_on_error=...)"
        )
        self.max_consecutive_failures = expect_int(
            max_consecutive_failures, "Trainer(max_consecutive_failures=...)", minimum=1
        )
        expect_choice(on_nonfinite, "Trainer(on_nonfinite=...)", ("raise", "skip"))
        self.max_consecutive_skips = expect_int(
            max_consecutive_skips, "Trainer(max_consecutive_skips=...)", minimum=1
        )
        self.tokens_per_sample = expect_int(
            tokens_per_sample,
            "Trainer(tokens_per_sample=...)",
            minimum=1,
            optional=True,
        )
        self.flops_per_step = expect_number(
            flops_per_step, "Trainer(flops_per_step=...)"
        )
        self.peak_flops_per_device = expect_number(
            peak_flops_per_device, "Trainer(peak_flops_per_device=...)"
        )
        self.histograms_every = expect_int(
            histograms_every, "Trainer(histograms_every=...)", minimum=1, optional=True
        )
        if profile is not None and not isinstance(profile, Profile):
            raise ArgumentError(
                f"`Trainer(profile=...)` expected a `tx.loggers.Profile` or None, got "
                f"{describe_value(profile)}.",
                suggestion="Pass `profile=tx.loggers.Profile(start=10, steps=3, "
                'logdir="runs/profile")`.',
            )
        self.profile = profile
        self.mesh = mesh if mesh is not None else _default_mesh(plan)
        self.plan = plan
        self.model = model
        self.optimizer = optimizer
        self.train_step = TrainStep(
            loss,
            optimizer,
            plan,
            self.mesh,
            trainable=trainable,
            precision=precision,  # type: ignore[arg-type]
            on_nonfinite=on_nonfinite,
            mode=mode,
            stage=stage,
        )
        self.checkpoint = checkpoint
        self.on_nonfinite = on_nonfinite
        self.state: TrainState | None = None
        self.stop_reason: StopReason | None = None
        self._header_done = False
        self._flops: dict[int, float | None] = {}  # FLOPs per step, per program
        self._ran: set[int] = set()  # programs that have run (compiled)

    # --- state ----------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """The current `TrainState`, created (sharded) on first use."""
        if self.state is None:
            started = time.perf_counter()
            self.state = self.train_step.init(self.model, jax.random.key(self.seed))
            jax.block_until_ready(self.state)
            self._event("place model", time.perf_counter() - started)
        return self.state

    def _event(self, name: str, seconds: float) -> None:
        """A start-up phase and its time, for loggers that show them."""
        emit(self.loggers, "event", name, seconds)

    # --- the loop -------------------------------------------------------------------

    def fit(
        self,
        data: Iterable[Any],
        steps: int | None = None,
        epochs: int | None = None,
        *,
        resume: bool | str = False,
        strict: bool = False,
        drop_last: bool = True,
    ) -> TrainState:
        """Train on `data` until `state.step == steps`, or for `epochs` passes.

        **Arguments:**

        - `data`: an iterable of host batches (PyTrees of numpy arrays with a leading
            batch dim; on many hosts, each process yields its own rows), or a
            `titanax.data` pipeline. A pipeline is read from `state.data_position`
            (in O(1)), so successive `fit` calls, and resumed runs, go on through
            its stream; a plain iterable is read from its start.
        - `steps`: the step to train until: a total, not a count for this call
            (`fit(data, steps=30)` after step 10 takes 20 steps). `data` is
            re-iterated as needed.
        - `epochs`: passes over `data` (default 1 when `steps` is None). With both,
            training stops at whichever comes first.
        - `resume`: `True` restores the latest complete checkpoint of `checkpoint`
            (an empty checkpoint directory starts fresh, with a warning) and
            continues at its step, RNG stream and data position; `data` must be the
            same stream as the interrupted run's: its first `state.data_position`
            samples are skipped (a pipeline starts there directly). A path restores
            from that checkpoint directory, which must hold one.
        - `strict`: raise `DataExhaustedError` (after saving) if the data ends
            before `steps`; by default a `DataExhaustedWarning` says so.
        - `drop_last`: drop a batch with fewer rows than the first (the partial
            last batch of an epoch), with a warning; `False`: it raises
            `BatchError`. Either way the state is intact.

        **Returns:** the final `TrainState` (also `trainer.state`);
        `trainer.stop_reason` says why it stopped (`"finished"`, or
        `"data_exhausted"`).

        **Raises:** `tx.Preempted` after saving a checkpoint, on SIGTERM (a
        `SystemExit` with exit code 75: the script ends "requeue me");
        `KeyboardInterrupt` after saving; `BatchError`, `StepFailedError`,
        `NonFiniteError`, `DataExhaustedError` as described above; an exception of
        the data iterator itself, after a checkpoint of the last good step.
        """
        steps = expect_int(steps, "fit(steps=...)", minimum=1, optional=True)
        epochs = expect_int(epochs, "fit(epochs=...)", minimum=1, optional=True)
        resume = expect_path_or_bool(resume, "fit(resume=...)")
        expect_bool(strict, "fit(strict=...)")
        expect_bool(drop_last, "fit(drop_last=...)")
        _check_data(data)
        if steps is None and epochs is None:
            epochs = 1
        self.stop_reason = None
        state = self.init_state()
        if resume is not False:
            state = self._resume(state, resume, data)
        first_step = int(jax.device_get(state.step))
        self._log_header(total_steps=steps, start_step=first_step)
        if steps is not None and first_step >= steps:
            warnings.warn(
                f"`fit(steps={steps})`: the state is already at step {first_step}; "
                "nothing to train (`steps` is a total, not a count).",
                stacklevel=2,
            )
            self.stop_reason = "finished"
            return state
        # A pipeline is one global stream indexed by sample: it always goes on at
        # the state's position. A plain iterable is new data: read from its start
        # (after a resume, skipping what the checkpointed run consumed).
        position = (
            int(jax.device_get(state.data_position))
            if resume is not False or _is_pipeline(data)
            else 0
        )
        loop = _Loop(self, data, epochs, position, drop_last)
        return loop.run(state, first_step, steps, strict)

    # --- checkpoints ----------------------------------------------------------------

    def _resume(self, state: TrainState, resume: bool | str, data: Any) -> TrainState:
        checkpoint = self.checkpoint
        if isinstance(resume, str):
            # A path must hold a checkpoint: a typo must not start from step 0.
            checkpoint = OrbaxCheckpoint.existing(resume)
        if checkpoint is None:
            raise ArgumentError(
                "Expected a checkpoint to resume from with `fit(resume=True)`, got a "
                "Trainer without `checkpoint=`.",
                suggestion=(
                    "Pass `checkpoint=tx.OrbaxCheckpoint(path)` to the Trainer, or "
                    "`fit(data, resume=path)`."
                ),
            )
        if checkpoint.latest_step() is None:
            warnings.warn(
                f"`fit(resume=True)`: no checkpoint in {checkpoint!r} yet; starting "
                "from step 0.",
                stacklevel=3,
            )
            return state
        started = time.perf_counter()
        restored = checkpoint.restore(state)
        self._event("restore checkpoint", time.perf_counter() - started)
        if _is_pipeline(data) and callable(getattr(data, "check_resume", None)):
            saved = checkpoint.metadata(int(restored.step)).get("data")
            if saved:  # warns if the sample order changed since the save
                data.check_resume(saved)  # type: ignore[attr-defined]
        self.state = restored
        return restored

    def save(
        self, state: TrainState, step: int, *, force: bool = False, data: Any = None
    ) -> None:
        """Save `state` (at `step`) to the Trainer's checkpoint, if any; `data` (a
        `titanax.data` pipeline) is described in its metadata."""
        if self.checkpoint is not None:
            describe = getattr(data, "metadata", None)
            self.checkpoint.save(
                state,
                step=step,
                force=force,
                plan=self.plan,
                mesh=self.mesh,
                data=describe() if _is_pipeline(data) and callable(describe) else None,
            )

    # --- logging --------------------------------------------------------------------

    def _log_header(self, total_steps: int | None, start_step: int) -> None:
        """The run header, once per Trainer (the first `fit`'s totals size the
        progress bar)."""
        if self._header_done or not self.loggers:
            return
        self._header_done = True
        info = run_header(
            mesh=self.mesh,
            plan=self.plan,
            optimizer=self.optimizer,
            precision=self.train_step.precision.name,
            total_steps=total_steps,
            start_step=start_step,
        )
        for logger in self.loggers:
            logger.header(info)

    def _meter(
        self, program: CompiledStep, arrays: list[Any], leaves: list[Any]
    ) -> Meter:
        """The meter of one `fit`: throughput, step-time statistics, memory, and MFU
        where the device's peak is known (or given)."""
        device = self.mesh.devices.flat[0]
        peak = self.peak_flops_per_device
        if peak is None:
            peak = peak_flops_per_device(device, _compute_kind(self, device))
        flops = self.flops_per_step
        if flops is None and peak is not None:
            key = id(program)
            if key not in self._flops:  # compiled already: jit's cache serves it
                compiled = program.lower(arrays, leaves).compile()
                self._flops[key] = step_flops(
                    compiled, program.run, (arrays, leaves), self.mesh.size
                )
            flops = self._flops[key]
        return Meter(
            batch_size=program.batch.rows,
            tokens_per_sample=self.tokens_per_sample,
            flops_per_step=flops,
            peak_flops=peak * self.mesh.size if peak is not None else None,
            memory=True,
        )

    # --- evaluation and reports -----------------------------------------------------

    def evaluate(
        self, data: Iterable[Any], max_batches: int | None = None
    ) -> dict[str, float]:
        """Mean loss and metrics over `data` under the current state, no update.

        Batches may have any leading size the data axes divide (not necessarily the
        training batch size); means are weighted by rows, or by a batch's `"mask"`
        leaf when it has one (a padded `titanax.data` pipeline: the loss should use
        the mask too). A pipeline is read from its sample 0. The loss is called with
        `key=None` (no dropout).
        """
        _check_data(data)
        expect_int(max_batches, "evaluate(max_batches=...)", minimum=1, optional=True)
        state = self.init_state()
        totals: dict[str, Any] = {}
        rows = batches = 0
        if _is_pipeline(data):
            data = data.batches(0, self.plan, self.mesh, accumulate=False)  # type: ignore[attr-defined]
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            metrics = self.train_step.evaluate(state, batch)
            n = _weight(batch)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value * n
            rows += n
            batches += 1
        if rows == 0:
            raise ArgumentError(
                "Expected `evaluate(data=...)` to yield at least one batch, got none.",
                suggestion="Pass a non-empty iterable of batches.",
            )
        return {k: float(v) / rows for k, v in jax.device_get(totals).items()}

    def explain(self, batch: Any) -> Explanation:
        """`tx.explain` for this run: parameter rows, per-device bytes of parameters,
        gradients and optimizer state, and from the compiled step its collectives and
        XLA's memory analysis (`Explanation.step_memory`; printed: activations +
        scratch per device, its temporary buffers, or "unavailable" on a backend
        without one)."""
        state = self.init_state()
        program = self.train_step.compile(state, batch)
        lowered = program.lower(program.flatten(state), program.place(batch))
        spec = jax.tree.unflatten(jax.tree.structure(state.model), list(program.mask))
        return explain(
            state.model,
            self.plan,
            self.mesh,
            compiled=lowered.compile(),
            extra_bytes_per_device={
                "grads": bytes_per_device(eqx.filter(state.model, spec)),
                "optimizer state": bytes_per_device(state.opt_state),
            },
        )


def _max_ahead(mesh: Mesh) -> int:
    """Every this many steps the loop waits for the step this many steps back, so
    at most twice as many are queued; 0: it never waits.

    Only for several CPU devices in one process: there, hundreds of queued steps
    with collectives can deadlock XLA:CPU, whose all-reduce rendezvous then aborts
    the process after 40 s (a tiny MLP under DP=8 on 2 cores, runs of 4,000 steps:
    16 of 25 runs aborted with 64 to 500 steps queued, the Trainer and plain
    `jax.jit` loops alike; 0 of 11 with at most 32). Waiting costs nothing
    when the devices are the bottleneck. One device has no collectives, and
    accelerators run theirs on streams: no wait, the host runs ahead freely."""
    devices = mesh.devices.flat
    if mesh.devices.size > 1 and all(d.platform == "cpu" for d in devices):
        return 8
    return 0


class _DataFailed(Exception):
    """The data iterator raised (`__cause__`); raised out of `_Loop.read`."""


class _Loop:
    """One `fit` call: the loop's host-side state, in one place.

    The per-step path (`run`'s while loop) reads locals only: on a dispatch-bound
    model every attribute lookup and call shows in the step time.
    """

    def __init__(
        self,
        trainer: Trainer,
        data: Any,
        epochs: int | None,
        position: int,
        drop_last: bool,
    ):
        self.trainer = trainer
        self.data = data
        self.epochs = epochs
        self.position = position  # samples to skip (resume)
        self.drop_last = drop_last
        self.program: CompiledStep | None = None
        self.arrays: list[Any] = []
        self.batches_read = 0
        self.dropped = 0
        self.skipped_reported = 0

    # --- reading ------------------------------------------------------------------

    def stream(self) -> Generator[Any, None, None]:
        """The raw batches: a pipeline from the resume position, or `epochs` passes
        over an iterable (forever if None)."""
        data = self.data
        if _is_pipeline(data):
            yield from self.pipeline_stream(data)
            return
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            produced = False
            for batch in data:
                produced = True
                yield batch
            epoch += 1
            if not produced or iter(data) is data:
                return  # empty, or a one-shot iterator that cannot be replayed

    def pipeline_stream(self, data: Any) -> Generator[Any, None, None]:
        """A `titanax.data` pipeline from the resume position (it starts there in
        O(1): nothing to skip), for `epochs` passes from its sample 0 if given."""
        start, self.position = self.position, 0
        trainer = self.trainer
        batches = data.batches(start, trainer.plan, trainer.mesh)
        limit = None
        if self.epochs is not None:
            limit = self.epochs * data.samples_per_epoch
        try:
            while limit is None or batches.position + data.global_batch_size <= limit:
                yield next(batches)
        except StopIteration:
            return
        finally:
            batches.close()  # stops the read-ahead threads

    def read(self, source: Iterator[Any]) -> Any:
        """The next raw batch, or None at the end of the data."""
        try:
            batch = next(source)
        except StopIteration:
            return None
        except Exception as e:
            raise _DataFailed() from e
        self.batches_read += 1
        return batch

    def skip_consumed(self, source: Iterator[Any], batch: Any, rows: int) -> Any:
        """Resume on a plain iterable: skip the batches the checkpointed run
        consumed (its full batches; partial ones it dropped are skipped uncounted)."""
        full = self.position // rows
        local_rows = _rows(batch)
        while full > 0 and batch is not None:
            if not (self.drop_last and _rows(batch) < local_rows):
                full -= 1
            batch = self.read(source)
        return batch

    # --- the loop -----------------------------------------------------------------

    def run(
        self, state: TrainState, step: int, end: int | None, strict: bool
    ) -> TrainState:
        trainer = self.trainer
        source = self.stream()
        guard = PreemptionGuard() if trainer.checkpoint is not None else None
        try:
            if guard is not None:
                guard.__enter__()
            batch = self.read(source)
            if batch is None:
                raise ArgumentError(
                    "Expected `fit(data=...)` to yield at least one batch, got none.",
                    suggestion="Check the data source; pass a non-empty iterable.",
                )
            program = self.program = trainer.train_step.compile(
                state, batch, packed=True
            )
            self.arrays = program.flatten(state)
            rows = program.batch.rows
            if self.position:
                batch = self.skip_consumed(source, batch, rows)
            step = self.loop(source, batch, step, end, guard)
        except KeyboardInterrupt:
            self.finish("interrupted", step_of(self))
            raise
        except _DataFailed as failed:
            error = failed.__cause__
            assert error is not None
            self.finish("failed", step_of(self))
            error.add_note(
                f"Titanax: the data iterator raised after {self.batches_read} "
                f"batches; the state after step {step_of(self)} is in "
                "`trainer.state`"
                + (" and was checkpointed." if trainer.checkpoint else ".")
            )
            raise error from None
        except Preempted:
            raise
        except BaseException:
            self.trainer.stop_reason = "failed"
            self.keep_state()
            raise
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)
            if trainer.profile is not None:
                trainer.profile.close()  # a run that ended inside the window
            source.close()  # a pipeline's read-ahead threads stop
        return self.state_after(step, end, strict)

    def loop(
        self,
        source: Iterator[Any],
        batch: Any,
        step: int,
        end: int | None,
        guard: PreemptionGuard | None,
    ) -> int:
        trainer = self.trainer
        program = self.program
        assert program is not None
        run, check = program.run, program.leaves
        checkpoint, log_every = trainer.checkpoint, trainer.log_every
        # A failed background save raises at the next step, not at the next save.
        saves_failed = getattr(checkpoint, "raise_if_failed", None)
        drop_last, continue_on_error = self.drop_last, trainer.continue_on_error
        arrays = self.arrays
        profile, histograms_every = trainer.profile, trainer.histograms_every
        metrics: Any = None  # the last step's metrics vector (`program.metrics`)
        meter: Meter | None = None
        timer, last_logged = time.perf_counter(), step
        failures: list[BaseException] = []  # consecutive
        ahead, landmark = _max_ahead(trainer.mesh), None
        while batch is not None and (end is None or step < end):
            try:
                leaves = check(batch)
                if profile is not None:
                    profile.before_step(step)
                arrays, metrics = run(arrays, leaves)
            except ShortBatch as e:
                if not drop_last:
                    raise
                self.dropped += 1
                if self.dropped == 1:
                    warnings.warn(
                        f"Dropped a partial batch ({e.message}); "
                        "`fit(drop_last=False)` raises instead.",
                        stacklevel=4,
                    )
                batch = self.read(source)
                continue
            except (TitanaxError, KeyboardInterrupt) as e:
                if not (continue_on_error and isinstance(e, BatchError)):
                    raise
                arrays = self.failed(e, step, arrays, failures)
                batch = self.read(source)
                continue
            except Exception as e:
                if not continue_on_error:
                    self.arrays = arrays
                    raise StepFailedError(
                        f"Step {step + 1} failed: {type(e).__name__}: {e}",
                        suggestion=(
                            "Fix the cause above, or pass `continue_on_error=True` to "
                            "skip failing batches."
                        ),
                    ) from e
                arrays = self.failed(e, step, arrays, failures)
                batch = self.read(source)
                continue
            failures.clear()
            step += 1
            self.arrays = arrays
            if ahead and step % ahead == 0:
                # At most 2 * ahead steps queued (see `_max_ahead`).
                if landmark is not None:
                    jax.block_until_ready(landmark)
                landmark = metrics
            if profile is not None:
                profile.after_step(step, metrics)
            if meter is None:
                meter = self.first_step(program, arrays, leaves, metrics, timer)
                timer, last_logged = time.perf_counter(), step
            if histograms_every is not None and step % histograms_every == 0:
                self.histograms(step, leaves)
            # Read and checked while the step runs; its transfer is part of the next
            # (asynchronous) dispatch.
            batch = self.read(source)
            if saves_failed is not None:
                saves_failed()
            if checkpoint is not None and checkpoint.should_save(step):
                self.check_nonfinite(step)  # never save after a bad step
                trainer.save(self.current(step), step, data=self.data)
            if step % log_every == 0:
                self.log(step, metrics, meter, step - last_logged, timer)
                timer, last_logged = time.perf_counter(), step
            # The same answer on every process for the same step: all save it.
            if guard is not None and guard.should_stop(step):
                self.preempted(step)
        if metrics is not None and step != last_logged and meter is not None:
            self.log(step, metrics, meter, step - last_logged, timer)
        return step

    def first_step(
        self,
        program: CompiledStep,
        arrays: list[Any],
        leaves: list[Any],
        metrics: jax.Array,
        started: float,
    ) -> Meter:
        """After a `fit`'s first step (left out of the meter's timing): its time is
        the compile time if the program had never run."""
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - started
        trainer = self.trainer
        meter = trainer._meter(program, arrays, leaves)
        if id(program) not in trainer._ran:
            trainer._ran.add(id(program))
            trainer._event("compile step", seconds)
            meter.record_compile(seconds)
        return meter

    def histograms(self, step: int, leaves: list[Any]) -> None:
        """Per-layer parameter and gradient norms (the gradients of this step's
        batch under the new state: one extra forward and backward) to the loggers
        that draw histograms."""
        trainer = self.trainer
        state = self.current(step)
        rules = trainer.plan.rules
        program = self.program
        assert program is not None
        batch = jax.tree.unflatten(program.batch.treedef, leaves)
        grads = trainer.train_step.gradients(state, batch)
        norms = jax.device_get(
            {
                "param_norm": _layer_norms(state.model, rules),
                "grad_norm": _layer_norms(grads, rules),
            }
        )
        emit(trainer.loggers, "histograms", step, norms)

    # --- failures -----------------------------------------------------------------

    def failed(
        self,
        error: BaseException,
        step: int,
        arrays: list[Any],
        failures: list[BaseException],
    ) -> list[Any]:
        """`continue_on_error`: warn, count the batch as consumed, and go on, up to
        `max_consecutive_failures` in a row."""
        trainer = self.trainer
        program = self.program
        assert program is not None
        if any(x.is_deleted() for x in arrays):
            self.arrays = arrays
            raise StepFailedError(
                f"Step {step + 1} failed after its state was donated to it: "
                f"{type(error).__name__}: {error}",
                suggestion="Resume from the last checkpoint (`fit(..., resume=True)`).",
            ) from error
        failures.append(error)
        warnings.warn(
            f"Step {step + 1} failed and its batch was skipped "
            f"(continue_on_error=True; {len(failures)} in a row): "
            f"{type(error).__name__}: {error}",
            stacklevel=5,
        )
        state = program.unflatten(arrays)
        state = eqx.tree_at(
            lambda s: s.data_position,
            state,
            state.data_position + program.batch.rows,
        )
        arrays = self.arrays = program.flatten(state)
        if len(failures) >= trainer.max_consecutive_failures:
            first = failures[0]
            raise StepFailedError(
                f"{len(failures)} consecutive steps failed (max_consecutive_failures="
                f"{trainer.max_consecutive_failures}); the first, at step "
                f"{step + 1}: {type(first).__name__}: {first}",
                suggestion=(
                    "Every batch fails: fix the cause of the first failure (the data, "
                    "the loss) instead of skipping."
                ),
            ) from first
        return arrays

    def check_nonfinite(self, step: int) -> dict[str, int]:
        """Raise `NonFiniteError` per `on_nonfinite`; return the counters."""
        trainer = self.trainer
        program = self.program
        assert program is not None
        state = program.unflatten(self.arrays)
        first_bad, bad, streak = (
            int(x)
            for x in jax.device_get(
                (state.first_bad_step, state.bad_steps, state.bad_streak)
            )
        )
        counters = {"bad_steps": bad}
        if first_bad < 0:
            return counters
        if not trainer.train_step.skips_nonfinite:
            trainer.state = self.current(step)
            raise NonFiniteError(
                f"Expected a finite loss and gradients, got non-finite values at step "
                f"{first_bad + 1}; the state includes that step's non-finite update. "
                f"`trainer.state` is the state after step {step}; no checkpoint was "
                "saved after the bad step.",
                suggestion=(
                    "Resume from the last checkpoint with a lower learning rate, check "
                    "the data near that step, use `precision=tx.Precision.fp32()`, or "
                    "pass `on_nonfinite='skip'` to skip such steps on device."
                ),
            )
        if bad > self.skipped_reported:
            if self.skipped_reported == 0:
                warnings.warn(
                    SkippedStepsWarning(
                        f"{bad} step(s) up to step {step} had a non-finite loss or "
                        f"gradients and were skipped (the first: step {first_bad + 1})"
                        "; the log line's `skipped` counts them."
                    ),
                    stacklevel=5,
                )
            self.skipped_reported = bad
        if streak > trainer.max_consecutive_skips:
            trainer.state = self.current(step)
            raise NonFiniteError(
                f"Expected training to recover from non-finite steps, got {streak} "
                f"skipped in a row up to step {step} (max_consecutive_skips="
                f"{trainer.max_consecutive_skips}); {bad} skipped in all.",
                suggestion=(
                    "Lower the learning rate, check the data and the loss for "
                    "NaN/inf, or use fp32; resume from the last checkpoint."
                ),
            )
        return counters

    def preempted(self, step: int) -> None:
        """SIGTERM: save this step, keep the state, raise `Preempted`."""
        self.finish("preempted", step)
        raise Preempted(step)

    # --- logging ------------------------------------------------------------------

    def log(
        self,
        step: int,
        metrics: jax.Array,
        meter: Meter | None,
        steps_timed: int,
        since: float,
    ) -> None:
        trainer = self.trainer
        program = self.program
        assert program is not None
        host = program.host_metrics(metrics)
        elapsed = time.perf_counter() - since
        if meter is not None and steps_timed > 0 and elapsed > 0:
            host.update(meter.update(steps_timed, elapsed))
        counters = self.check_nonfinite(step)
        if trainer.train_step.skips_nonfinite:
            host["skipped"] = float(counters["bad_steps"])
        for logger in trainer.loggers:
            logger.log(step, host)
        if trainer.hooks:
            # Hooks see the current state (e.g. to `evaluate`); it is valid until the
            # next step, which donates its buffers.
            trainer.state = self.current(step)
        for hook in trainer.hooks:
            hook(step, host, trainer)

    # --- ending -------------------------------------------------------------------

    def current(self, step: int) -> TrainState:
        del step
        program = self.program
        assert program is not None
        return program.unflatten(self.arrays)

    def alive(self) -> bool:
        return bool(self.arrays) and not any(x.is_deleted() for x in self.arrays)

    def keep_state(self) -> None:
        """After an error: `trainer.state` is the last intact state (None if the
        failing step had already consumed it)."""
        if self.program is None:
            return
        self.trainer.state = self.current(0) if self.alive() else None

    def finish(self, reason: StopReason, step: int) -> None:
        """Keep the state and checkpoint it (unless consumed or after a bad step)."""
        trainer = self.trainer
        trainer.stop_reason = reason
        self.keep_state()
        if trainer.checkpoint is None or self.program is None:
            return
        if not self.alive():
            warnings.warn(
                f"Step {step}'s state was donated when training stopped; not saving "
                "it. The latest checkpoint is intact.",
                stacklevel=4,
            )
            return
        try:
            self.check_nonfinite(step)
        except NonFiniteError:
            warnings.warn(
                f"A non-finite step reached the state before step {step}; not saving "
                "it. The latest checkpoint is intact.",
                stacklevel=4,
            )
            return
        trainer.save(self.current(step), step, force=True, data=self.data)
        trainer.checkpoint.wait()

    def state_after(self, step: int, end: int | None, strict: bool) -> TrainState:
        """The normal end: the data ran out, or `step == end`."""
        trainer = self.trainer
        exhausted = end is not None and step < end
        self.check_nonfinite(step)
        self.finish("data_exhausted" if exhausted else "finished", step)
        assert trainer.state is not None
        if exhausted:
            message = (
                f"The data ended after {self.batches_read} batches, at step {step} of "
                f"`steps={end}`."
            )
            fix = (
                "Pass more data (an iterable that can be re-iterated goes on for "
                "more epochs; a one-shot iterator cannot), or a smaller `steps`."
            )
            if strict:
                raise DataExhaustedError(message, suggestion=fix)
            warnings.warn(DataExhaustedWarning(f"{message} {fix}"), stacklevel=3)
        return trainer.state


@functools.partial(jax.jit, static_argnums=(1, 2))
def _norms_program(arrays: Any, static: Any, rules: Any) -> dict[str, jax.Array]:
    return layer_norms(eqx.combine(arrays, static), rules)


def _layer_norms(tree: Any, rules: Any) -> dict[str, jax.Array]:
    """`tx.loggers.layer_norms` computed where the arrays are (one compiled
    program per model structure)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return _norms_program(arrays, static, rules)


def _compute_kind(trainer: Trainer, device: Any) -> str:
    """The tensor-core rate a step runs at: bf16/fp16 compute at the bf16 rate;
    float32 matmuls at JAX's default precision run as TF32 on NVIDIA GPUs and as
    bf16 passes on TPUs."""
    if trainer.train_step.precision.name != "fp32":
        return "bf16"
    return {"gpu": "tf32", "tpu": "bf16"}.get(device.platform, "fp32")


def default_loggers() -> list[Logger]:
    """A progress bar on a terminal (process 0), else `Basic` log lines."""
    return [Progress()] if Progress.available() else [Basic()]


def step_of(loop: _Loop) -> int:
    """The step of the loop's current state (the device's count)."""
    if loop.program is None or not loop.alive():
        return -1
    return int(jax.device_get(loop.program.unflatten(loop.arrays).step))


def _weight(batch: Any) -> int:
    """A batch's weight in an average over batches: its global rows, or its mask's
    true rows (a padded batch)."""
    mask = batch.get("mask") if isinstance(batch, Mapping) else None
    if mask is not None:
        return int(np.sum(np.asarray(mask))) * jax.process_count()
    return _rows(batch) * jax.process_count()


def _rows(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves else 0
