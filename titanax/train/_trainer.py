"""`tx.Trainer`: a thin loop over `make_train_step`.

The loop never blocks the host on a step: the step is dispatched asynchronously, the
next batch is read and checked while it runs and copied to the devices by the next
dispatch (so, in the steady state, also while it runs), and metrics are fetched only
at log steps.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from .._errors import TitanaxError, TrainerError
from .._explain import Explanation, bytes_per_device, explain
from .._mesh import make_mesh
from .._plan import Plan
from ..checkpoint._preemption import PreemptionGuard
from ..loggers import Logger, Meter, run_header
from ..parallel.pipeline import Stage
from ._precision import Precision
from ._state import TrainState
from ._step import LossFn, Trainable, TrainStep

__all__ = ["Hook", "Trainer"]

Hook = Callable[[int, dict[str, float], "Trainer"], None]


def _default_mesh(plan: Plan) -> Mesh:
    axes = plan.mesh_axes
    if not axes:
        return make_mesh(jax.devices()[:1], replica=1)
    if len(axes) == 1:
        return make_mesh(None, **{axes[0]: -1})
    raise TrainerError(
        f"The plan uses several mesh axes {axes}; Titanax will not guess their sizes.",
        suggestion=(
            "Pass `mesh=tx.make_mesh(" + ", ".join(f"{a}=..." for a in axes) + ")`."
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
        the end, on `KeyboardInterrupt` and on SIGTERM.
    - `loggers`: `tx.loggers.Basic()`, `CSV(...)`, `TensorBoard(...)`, ...
    - `log_every`: fetch and log metrics every this many steps.
    - `seed`: the run's PRNG seed (model init and step keys).
    - `continue_on_error`: `False` re-raises a failing step as `TrainerError` naming
        the step; `True` warns and goes on with the next batch.
    - `on_nonfinite`: `"raise"` (default) raises `TrainerError` at the next log step
        or checkpoint, naming the first step whose loss or gradients were not finite;
        no checkpoint is saved after it (`trainer.state` holds its non-finite update:
        resume from the last checkpoint). `"skip"` skips such steps on device (the
        state is kept, at the cost of a select per step) and goes on.
    - `hooks`: callables `hook(step, metrics, trainer)` run at each log step, with
        `trainer.state` current (so a hook may call `trainer.evaluate(...)`).
    - `tokens_per_sample`, `flops_per_step`: for the meter's tokens/s and MFU.
    - `mode`: `"jit"` (default) or `"spmd"`: the loss runs per device on its batch
        shard and may call `tx.collectives` (DP plans; see `tx.make_train_step`).
    - `stage`: a `tx.Stage`, required with a `PP` plan (see `tx.make_train_step`).

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
        loggers: Sequence[Logger] = (),
        log_every: int = 10,
        seed: int = 0,
        continue_on_error: bool = False,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        hooks: Sequence[Hook] = (),
        tokens_per_sample: int | None = None,
        flops_per_step: float | None = None,
        mode: Literal["jit", "spmd"] = "jit",
        stage: Stage | None = None,
    ):
        if not isinstance(plan, Plan):
            raise TrainerError(
                f"`plan` must be a `tx.Plan`, got {type(plan).__name__}.",
                suggestion="Use e.g. `tx.Plan(dp=tx.DP())`.",
            )
        if not isinstance(log_every, int) or log_every < 1:
            raise TrainerError(
                f"`log_every` must be an int ≥ 1, got {log_every!r}.",
                suggestion="Use e.g. `log_every=10`.",
            )
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
            precision=precision,
            on_nonfinite=on_nonfinite,
            mode=mode,
            stage=stage,
        )
        self.checkpoint = checkpoint
        self.loggers = tuple(loggers)
        self.log_every = log_every
        self.seed = seed
        self.continue_on_error = continue_on_error
        self.on_nonfinite = on_nonfinite
        self.hooks = tuple(hooks)
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_step = flops_per_step
        self.state: TrainState | None = None
        self._header_done = False
        self._skipped_batches = 0  # batches of failed steps, for the data position

    # --- state ----------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """The current `TrainState`, created (sharded) on first use."""
        if self.state is None:
            self.state = self.train_step.init(self.model, jax.random.key(self.seed))
        return self.state

    # --- the loop -------------------------------------------------------------------

    def fit(
        self,
        data: Iterable[Any],
        steps: int | None = None,
        epochs: int | None = None,
        *,
        resume: bool | str = False,
    ) -> TrainState:
        """Train on `data` for `steps` optimizer steps or `epochs` passes.

        **Arguments:**

        - `data`: an iterable of host batches (PyTrees of numpy arrays with a leading
            batch dim). On many hosts, each process yields its own slice.
        - `steps`: how many steps to take (re-iterating `data` as needed).
        - `epochs`: how many passes over `data` (default 1 when `steps` is None).
        - `resume`: `True` restores the latest complete checkpoint of `checkpoint`
            and continues at its step, RNG stream and data position: the first
            `state.data_position` batches of `data` (the same stream as the
            interrupted run) are skipped. Without `resume`, `data` is read from its
            start.

        **Returns:** the final `TrainState` (also kept as `trainer.state`). On
        `KeyboardInterrupt`, returns the last complete state.
        """
        if steps is None and epochs is None:
            epochs = 1
        state = self.init_state()
        if resume:
            state = self._resume(state, resume)
        self._log_header()
        train = self.train_step
        arrays = train.flatten(state)
        step = int(jax.device_get(state.step))
        position = int(jax.device_get(state.data_position))
        # The states this loop hands out carry its own count of batches: the step
        # count plus the batches of failed steps skipped under `continue_on_error`
        # (which the device's count, one per step, does not see).
        self._skipped_batches = position - step
        # Only a resumed run skips what the checkpointed run already consumed; a
        # further `fit` on the same trainer starts at the new data's beginning.
        stream = _stream(data, epochs, skip=position if resume else 0)
        end = None if steps is None else step + steps
        metrics: dict[str, Any] = {}
        meter: Meter | None = None
        timer, last_logged = time.perf_counter(), step
        guard = PreemptionGuard() if self.checkpoint is not None else None
        # The per-step path below reads locals only: on a dispatch-bound model every
        # attribute lookup and call shows in the step time.
        run, checkpoint, log_every = train.step_flat, self.checkpoint, self.log_every
        try:
            if guard is not None:
                guard.__enter__()
            batch = _next_batch(stream, train)
            rows = batch[0].shape[0] if batch else 0  # global, on any host count
            # A first step that compiles is left out of the meter's timing.
            if not train.compiles_next_step:
                meter = self._meter(batch_size=rows)
                timer = time.perf_counter()
            while batch is not None and (end is None or step < end):
                try:
                    arrays, metrics = run(arrays, batch)
                except (TitanaxError, KeyboardInterrupt):
                    raise
                except Exception as e:
                    self._skip_failed_step(e, step + 1, arrays)
                    self._skipped_batches += 1
                    batch = _next_batch(stream, train)
                    continue
                step += 1
                # Read and checked while the step runs; its transfer is part of the
                # next (asynchronous) dispatch.
                batch = _next_batch(stream, train)
                if meter is None:
                    jax.block_until_ready(metrics)
                    meter = self._meter(batch_size=rows)
                    timer, last_logged = time.perf_counter(), step
                if step % log_every == 0:
                    self._log(step, metrics, arrays, meter, step - last_logged, timer)
                    timer, last_logged = time.perf_counter(), step
                if checkpoint is not None and checkpoint.should_save(step):
                    self._save_checkpoint(arrays, step)
                if guard is not None and guard.requested:
                    # Preempted (SIGTERM): the step finished; save it and stop.
                    warnings.warn(
                        f"Preemption signal received; stopping after step {step} "
                        "and saving a checkpoint.",
                        stacklevel=2,
                    )
                    break
        except KeyboardInterrupt:
            warnings.warn(
                f"Training interrupted at step {step}; returning the last state.",
                stacklevel=2,
            )
            self.state = self._state_at(arrays, step)
            self._final_checkpoint(arrays, step)
            return self.state
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)
        self.state = self._state_at(arrays, step)
        if metrics and step != last_logged and meter is not None:
            self._log(step, metrics, arrays, meter, step - last_logged, timer)
        self._check_nonfinite(arrays, step)
        self._final_checkpoint(arrays, step)
        return self.state

    def _skip_failed_step(
        self, error: Exception, step: int, arrays: list[jax.Array]
    ) -> None:
        """Raise `TrainerError` for a failed `step`, or warn and go on
        (`continue_on_error=True`) if its state was not donated yet."""
        if not self.continue_on_error:
            raise TrainerError(
                f"Step {step} failed: {type(error).__name__}: {error}",
                suggestion=(
                    "Fix the cause above, or pass `continue_on_error=True` to "
                    "skip failing batches."
                ),
            ) from error
        warnings.warn(
            f"Step {step} failed and was skipped "
            f"(continue_on_error=True): {type(error).__name__}: {error}",
            stacklevel=3,
        )
        if any(x.is_deleted() for x in arrays):
            raise TrainerError(
                f"Step {step} failed after its state was donated; cannot go on from "
                "it.",
                suggestion="Resume from the last checkpoint.",
            ) from error

    def _meter(self, batch_size: int) -> Meter:
        return Meter(
            batch_size=batch_size,
            tokens_per_sample=self.tokens_per_sample,
            flops_per_step=self.flops_per_step,
        )

    def _log(
        self,
        step: int,
        metrics: dict[str, Any],
        arrays: list[jax.Array],
        meter: Meter,
        steps_timed: int,
        since: float,
    ) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - since
        if steps_timed > 0 and elapsed > 0:
            host.update(meter.update(steps_timed, elapsed))
        self._check_nonfinite(arrays, step)
        for logger in self.loggers:
            logger.log(step, host)
        if self.hooks:
            # Hooks see the current state (e.g. to `evaluate`); it is valid until the
            # next step, which donates its buffers.
            self.state = self._state_at(arrays, step)
        for hook in self.hooks:
            hook(step, host, self)

    def _state_at(self, arrays: list[jax.Array], step: int) -> TrainState:
        """The state after `step`, with the data position the loop counted."""
        state = self.train_step.unflatten(arrays)
        sharding = state.data_position.sharding
        position = jax.make_array_from_callback(
            (), sharding, lambda _: np.asarray(step + self._skipped_batches, np.int32)
        )
        return eqx.tree_at(lambda s: s.data_position, state, position)

    def _check_nonfinite(self, arrays: list[jax.Array], step: int) -> None:
        if self.on_nonfinite != "raise":
            return
        first_bad = self._first_bad_step(arrays)
        if first_bad < 0:
            return
        state = self.state = self._state_at(arrays, step)
        if self.train_step._guarded:  # fp16: the scaler skipped it
            kept = "that step was skipped (no non-finite value reached the state)"
        else:
            kept = "the state includes that step's non-finite update"
        raise TrainerError(
            f"The loss or gradients were not finite at step {first_bad + 1}; {kept}. "
            f"`trainer.state` is the state after step {int(state.step)}; no "
            "checkpoint was saved after the bad step.",
            suggestion=(
                "Resume from the last checkpoint with a lower learning rate, check the "
                "data near that step, use `precision=tx.Precision.fp32()`, or pass "
                "`on_nonfinite='skip'` to skip such steps on device."
            ),
        )

    def _reached_by_bad_step(self, arrays: list[jax.Array]) -> bool:
        if self.on_nonfinite != "raise" or self.train_step._guarded:
            return False
        return self._first_bad_step(arrays) >= 0

    def _first_bad_step(self, arrays: list[jax.Array]) -> int:
        """The state's first non-finite step (-1: none); waits for the step."""
        state = self.train_step.unflatten(arrays)
        return int(jax.device_get(state.first_bad_step))

    def _log_header(self) -> None:
        if self._header_done or not self.loggers:
            return
        self._header_done = True
        info = run_header(
            mesh=self.mesh,
            plan=self.plan,
            optimizer=self.optimizer,
            precision=self.train_step.precision.name,
        )
        for logger in self.loggers:
            logger.header(info)

    # --- checkpoints ----------------------------------------------------------------

    def _resume(self, state: TrainState, resume: bool | str) -> TrainState:
        checkpoint = self.checkpoint
        if isinstance(resume, str):
            from ..checkpoint import OrbaxCheckpoint

            checkpoint = OrbaxCheckpoint(resume)
        if checkpoint is None:
            raise TrainerError(
                "`fit(resume=True)` needs a checkpoint to resume from.",
                suggestion=(
                    "Pass `checkpoint=tx.OrbaxCheckpoint(path)` to the Trainer, or "
                    "`fit(data, resume=path)`."
                ),
            )
        if checkpoint.latest_step() is None:
            return state  # nothing saved yet: a fresh start
        restored = checkpoint.restore(state)
        self.state = restored
        self.train_step.flatten(restored)
        return restored

    def _save_checkpoint(self, arrays: list[jax.Array], step: int) -> None:
        if self.checkpoint is not None:
            self._check_nonfinite(arrays, step)  # never save after a bad step
            self.checkpoint.save(
                self._state_at(arrays, step),
                step=step,
                plan=self.plan,
                mesh=self.mesh,
            )

    def _final_checkpoint(self, arrays: list[jax.Array], step: int) -> None:
        if self.checkpoint is None:
            return
        if any(x.is_deleted() for x in arrays):
            # Interrupted after its state was donated: the last save stays latest.
            warnings.warn(
                f"Step {step}'s state was donated when training stopped; not saving "
                "it. The latest checkpoint is intact.",
                stacklevel=3,
            )
            return
        if self._reached_by_bad_step(arrays):
            warnings.warn(
                f"A non-finite step reached the state before step {step}; not saving "
                "it. The latest checkpoint is intact.",
                stacklevel=3,
            )
            return
        self.checkpoint.save(
            self._state_at(arrays, step),
            step=step,
            force=True,
            plan=self.plan,
            mesh=self.mesh,
        )
        self.checkpoint.wait()

    # --- evaluation and reports -----------------------------------------------------

    def evaluate(
        self, data: Iterable[Any], max_batches: int | None = None
    ) -> dict[str, float]:
        """Mean loss and metrics over `data` under the current state, no update.

        Batches may have any leading size the data axes divide (not necessarily the
        training batch size); means are weighted by rows. The loss is called with
        `key=None` (no dropout).
        """
        state = self.init_state()
        totals: dict[str, Any] = {}
        rows = batches = 0
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            n = int(jax.tree.leaves(batch)[0].shape[0])
            metrics = self.train_step.evaluate(state, batch)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value * n
            rows += n
            batches += 1
        if rows == 0:
            raise TrainerError(
                "`evaluate` got no batches.",
                suggestion="Pass a non-empty iterable of batches.",
            )
        return {k: float(v) / rows for k, v in jax.device_get(totals).items()}

    def explain(self, batch: Any) -> Explanation:
        """`tx.explain` for this run: parameter rows, per-device bytes of parameters,
        gradients and optimizer state, and the collectives of the compiled step."""
        state = self.init_state()
        hlo = self.train_step.lower(state, batch).compile().as_text()
        trainable = jax.tree.map(
            lambda x, keep: x if keep else None,
            state.model,
            self.train_step._mask,
        )
        return explain(
            state.model,
            self.plan,
            self.mesh,
            hlo_text=hlo,
            extra_bytes_per_device={
                "grads": bytes_per_device(trainable),
                "optimizer state": bytes_per_device(state.opt_state),
            },
        )


def _stream(data: Iterable[Any], epochs: int | None, skip: int) -> Iterator[Any]:
    """Batches of `data`, for `epochs` passes (forever if None), skipping `skip`."""
    epoch = 0
    while epochs is None or epoch < epochs:
        produced = False
        for batch in data:
            produced = True
            if skip > 0:
                skip -= 1
                continue
            yield batch
        epoch += 1
        if not produced or iter(data) is data:
            return  # empty, or a one-shot iterator that cannot be replayed


def _next_batch(stream: Iterator[Any], train: TrainStep) -> list[Any] | None:
    """The next batch's leaves for `step_flat`, or None at the end of the data."""
    try:
        return train.step_batch(next(stream))
    except StopIteration:
        return None
