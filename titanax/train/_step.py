"""`tx.make_train_step`: the compiled, sharded, donated training step.

Two immutable objects, in the Optax spirit:

- `TrainStep` is the configuration (loss, optimizer, plan, mesh, precision, ...) and
    its pure functions: `init(model, key) -> TrainState`, `step(state, batch)`,
    `evaluate(state, batch)`.
- `CompiledStep` is one compiled program: the state's layout (treedef, where its
    arrays are, their shardings, the trainable mask) and the batch's (`BatchLayout`),
    fixed when it is built from a state and a batch, plus the `jax.jit` over the
    state's flat arrays (static half closed over, shardings pinned, state donated).
    Not `eqx.filter_jit`: it blocks the host on every call and refuses shardings.

`TrainStep.step` finds the program for its arguments' layouts in a cache owned by no
object (like `jax.jit`'s own), so a `TrainStep` never changes after construction.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._axes import is_arraylike, path_str
from .._checks import (
    describe_value,
    expect_bool,
    expect_callable,
    expect_choice,
    expect_mesh,
    expect_plan,
)
from .._errors import (
    ArgumentError,
    PipelineError,
    StepFailedError,
    TitanaxError,
    TrainerError,
)
from .._loss import split_loss_output
from .._plan import Plan
from .._sharding import init as sharded_init
from .._sharding import shard, shardings
from ..optim import current_lr
from ..parallel import collectives, spmd, spmd_specs, value_and_grad
from ..parallel.pipeline import Stage, pipeline_value_and_grad
from ._batch import BatchLayout, place_leaves, replicated
from ._precision import Precision
from ._state import TrainState

__all__ = [
    "CompiledStep",
    "LossFn",
    "TrainStep",
    "make_train_step",
    "opt_state_shardings",
    "trainable_mask",
]

LossFn = Callable[[Any, Any, jax.Array | None], Any]
Trainable = Any  # an Equinox filter spec PyTree, or (path: str, leaf) -> bool
_EVAL_KEY = None  # evaluation runs the loss with key=None: no dropout


# --- what trains ----------------------------------------------------------------------


def trainable_mask(model: Any, trainable: Trainable | None) -> tuple[bool, ...]:
    """A bool per leaf of `model` (`jax.tree.leaves` order): True for arrays that
    train.

    **Arguments:**

    - `model`: the model (or its `eqx.filter_eval_shape`: `ShapeDtypeStruct`s count
        as arrays).
    - `trainable`: `None` (every array), an Equinox filter spec PyTree (as for
        `eqx.partition`), or a callable `(path, leaf) -> bool` where `path` reads like
        `GPT.blocks.w_qkv`.

    **Raises:** `TrainerError` if nothing would train.
    """
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    if trainable is None:
        mask = tuple(is_arraylike(x) for _, x in leaves)
    elif callable(trainable) and not isinstance(trainable, eqx.Module):
        mask = tuple(
            is_arraylike(x) and bool(trainable(path_str(model, p), x))
            for p, x in leaves
        )
    else:  # an Equinox filter spec: what `eqx.filter` keeps
        is_none = lambda x: x is None  # noqa: E731
        chosen = jax.tree.leaves(eqx.filter(model, trainable), is_leaf=is_none)
        full = jax.tree.leaves(model, is_leaf=is_none)
        # Both flatten `None` fields as leaves, so they line up; `eqx.filter` put a
        # `None` where it dropped a leaf.
        mask = tuple(
            c is not None and is_arraylike(c)
            for m, c in zip(full, chosen, strict=True)
            if m is not None
        )
    if not any(mask):
        raise TrainerError(
            "Expected `trainable` to select at least one array of the model, got an "
            "empty selection.",
            suggestion=(
                "Pass a filter that selects at least one parameter, e.g. "
                "`trainable=lambda path, x: 'head' in path`."
            ),
        )
    return mask


def _mask_spec(model: Any, mask: tuple[bool, ...]) -> Any:
    """The mask as an Equinox filter spec: `model`'s structure, a bool per leaf."""
    return jax.tree.unflatten(jax.tree.structure(model), list(mask))


def opt_state_shardings(
    optimizer: optax.GradientTransformation,
    abstract_opt_state: Any,
    param_shardings: Any,
    mesh: Mesh,
) -> Any:
    """The sharding of each optimizer-state array: a parameter's moments live where
    the parameter lives; counts and other non-parameter leaves are replicated.

    A plain `jax.jit(opt.init)` would put Adam's moments whole on one device; the
    state's shardings are pinned from the parameters' instead.

    **Arguments:**

    - `optimizer`: the Optax transformation.
    - `abstract_opt_state`: `jax.eval_shape(optimizer.init, trainable_params)`.
    - `param_shardings`: the trainable parameters' shardings (same structure).
    - `mesh`: the mesh (for the replicated leaves).
    """
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: x is None,
    )


# --- the configuration ----------------------------------------------------------------


def _check_mode(mode: str, plan: Plan) -> None:
    expect_choice(mode, "make_train_step(mode=...)", ("jit", "spmd"))
    if mode == "spmd" and any(p is not None for p in (plan.fsdp, plan.tp, plan.pp)):
        raise ArgumentError(
            f'Expected a DP-only plan with mode="spmd" (the loss runs per device), '
            f"got {plan.describe()}.",
            suggestion=(
                'Use mode="jit" for FSDP/TP/PP plans, or write the whole step with '
                "`tx.spmd` and `tx.collectives` yourself."
            ),
        )


def _check_stage(stage: Any, plan: Plan) -> None:
    if plan.pp is None:
        if stage is not None:
            raise PipelineError(
                "Expected no `stage=` without a `pp` in the plan, got "
                f"{describe_value(stage)}.",
                suggestion="Add `pp=tx.PP(...)` to the plan, or drop `stage=`.",
            )
        return
    if not isinstance(stage, Stage):
        raise PipelineError(
            f"Expected a `tx.Stage` describing the model's pipelined stack (the plan "
            f"pipelines: {plan.describe()}), got {describe_value(stage)}.",
            suggestion=(
                "Pass `stage=tx.Stage(where=lambda m: m.blocks, pre=..., post=...)`; "
                "see docs/pipeline.md."
            ),
        )
    if plan.accumulate_steps > 1:
        raise PipelineError(
            f"Expected `DP(accumulate_steps=1)` with PP (pipeline microbatches "
            f"replace accumulation), got {plan.accumulate_steps}.",
            suggestion="Use `PP(microbatches=...)` and `DP(accumulate_steps=1)`.",
        )


def _check_optimizer(optimizer: Any, where: str) -> None:
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ArgumentError(
            f"`{where}` expected an `optax.GradientTransformation`, got "
            f"{describe_value(optimizer)}.",
            suggestion="Use e.g. `tx.optim.adamw(1e-3)` or `optax.sgd(0.1)`.",
        )


def _check_precision(precision: Any, where: str) -> Precision:
    if precision is None:
        return Precision.fp32()
    if not isinstance(precision, Precision):
        name = precision if isinstance(precision, str) else "bf16"
        raise ArgumentError(
            f"`{where}` expected a `tx.Precision` or None, got "
            f"{describe_value(precision)}.",
            suggestion=f"Use `tx.Precision.{name}()` (fp32, bf16 or fp16)."
            if name in ("fp32", "bf16", "fp16")
            else "Use `tx.Precision.fp32()`, `.bf16()` or `.fp16()`.",
        )
    return precision


def _check_trainable(trainable: Any, where: str) -> None:
    if trainable is None or callable(trainable) or isinstance(trainable, eqx.Module):
        return
    if isinstance(trainable, str | int | float) or not jax.tree.leaves(trainable):
        raise ArgumentError(
            f"`{where}` expected None, a `(path, leaf) -> bool` function or an "
            f"Equinox filter spec, got {describe_value(trainable)}.",
            suggestion="Pass e.g. `trainable=lambda path, x: 'head' in path`.",
        )


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
    """A training step's configuration and its pure functions.

    Built by `tx.make_train_step` (see there for the arguments). Unpacks as
    `init, step = tx.make_train_step(...)`. Immutable.

    **Methods:**

    - `init(model, key) -> TrainState`: place the model (or build it sharded, if
        `model` is a `key -> Module` function), create the optimizer state with pinned
        shardings, and return the `TrainState`.
    - `step(state, batch) -> (state, metrics)`: one optimizer step. `batch` is a host
        (numpy) PyTree, or the same PyTree of `jax.Array`s. The old state is donated.
    - `compile(state, batch) -> CompiledStep`: the program `step` runs for states
        and batches like these; its `run(arrays, batch_leaves)` takes flat lists (no
        PyTree work on the host: what `tx.Trainer` calls).
    - `evaluate(state, batch) -> metrics`: the loss and metrics without an update.
    - `lower(state, batch)`: the `jax.stages.Lowered` step, for HLO inspection.
    """

    loss: LossFn
    optimizer: optax.GradientTransformation
    plan: Plan
    mesh: Mesh
    trainable: Trainable | None = dataclasses.field(default=None, kw_only=True)
    precision: Precision = dataclasses.field(default=None, kw_only=True)  # type: ignore[assignment]
    on_nonfinite: Literal["raise", "skip"] = dataclasses.field(
        default="raise", kw_only=True
    )
    donate: bool = dataclasses.field(default=True, kw_only=True)
    mode: Literal["jit", "spmd"] = dataclasses.field(default="jit", kw_only=True)
    stage: Stage | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        where = "make_train_step"
        expect_callable(self.loss, f"{where}(loss=...)", "(model, batch, key) -> loss")
        _check_optimizer(self.optimizer, f"{where}(optimizer=...)")
        expect_plan(self.plan, f"{where}(plan=...)")
        expect_mesh(self.mesh, f"{where}(mesh=...)")
        _check_trainable(self.trainable, f"{where}(trainable=...)")
        precision = _check_precision(self.precision, f"{where}(precision=...)")
        object.__setattr__(self, "precision", precision)
        expect_choice(
            self.on_nonfinite, f"{where}(on_nonfinite=...)", ("raise", "skip")
        )
        expect_bool(self.donate, f"{where}(donate=...)")
        self.plan.check_mesh(self.mesh)
        _check_mode(self.mode, self.plan)
        _check_stage(self.stage, self.plan)

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter((self.init, self.step))

    @property
    def skips_nonfinite(self) -> bool:
        """Whether a non-finite step is skipped on device (`on_nonfinite="skip"`, or
        fp16 loss scaling) rather than applied and reported."""
        return self.on_nonfinite == "skip" or self.precision.dynamic_loss_scale

    # --- state --------------------------------------------------------------------

    def init(self, model: Any, key: jax.Array | int = 0) -> TrainState:
        """Build the sharded `TrainState` (see the class docstring)."""
        key = jax.random.key(key) if isinstance(key, int) else key
        model_key, run_key = jax.random.split(key)
        if isinstance(model, eqx.Module) and not isinstance(model, eqx.Partial):
            model = shard(model, self.plan, self.mesh)
        else:  # a `key -> Module` function: built directly sharded
            model = sharded_init(model, model_key, self.plan, self.mesh)
        spec = _mask_spec(model, trainable_mask(model, self.trainable))
        trainable = eqx.filter(model, spec)
        param_shardings = eqx.filter(shardings(model, self.plan, self.mesh), spec)
        abstract = jax.eval_shape(self.optimizer.init, trainable)
        opt_shardings = opt_state_shardings(
            self.optimizer, abstract, param_shardings, self.mesh
        )
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(trainable)
        rep = replicated(self.mesh)

        def scalar(value: int) -> jax.Array:
            return jax.device_put(jnp.asarray(value, jnp.int32), rep)

        loss_scale = self.precision.initial_loss_scale()
        return TrainState(
            model=model,
            opt_state=opt_state,
            step=scalar(0),
            rng=jax.device_put(jax.random.key_data(run_key), rep),
            data_position=scalar(0),
            loss_scale=jax.device_put(loss_scale, rep) if loss_scale else None,
            bad_steps=scalar(0),
            first_bad_step=scalar(-1),
            bad_streak=scalar(0),
        )

    # --- programs -----------------------------------------------------------------

    def compile(
        self, state: TrainState, batch: Any, *, packed: bool = False
    ) -> CompiledStep:
        """The program that steps states and batches laid out like these (built on
        first use, then reused: an equal layout gives the same program).

        `packed=True` gives the form `tx.Trainer` runs: the int32 counters travel as
        one vector and the metrics come back as one vector (`CompiledStep.metrics`
        names them). Every argument and result costs the host a buffer per device
        at each dispatch, so on a multi-device mesh this saves tens of buffers per
        step; `flatten`/`unflatten` then cost a small dispatch each, which a loop
        over flat arrays pays once."""
        return _program(self, state, batch, "fit" if packed else "train")

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One optimizer step; returns the new state and on-device metrics."""
        return self.compile(state, batch).step(state, batch)

    __call__ = step

    def lower(self, state: TrainState, batch: Any) -> Any:
        """The lowered step (`.compile().as_text()` gives its HLO,
        `.compile().memory_analysis()` its memory). `state` may be abstract
        (`tx.abstract_state(...)`): nothing is allocated for it."""
        program = self.compile(state, batch)
        return program.lower(program.flatten(state), program.place(batch))

    def evaluate(self, state: TrainState, batch: Any) -> dict[str, jax.Array]:
        """Loss and metrics of one batch under `state`, without an update.

        The batch may have any leading size the data axes divide (its shape need not
        match the training batches'; each new shape compiles once). The loss is
        called with `key=None` (no dropout).
        """
        program = _program(self, state, batch, "eval")
        return program.run(program.flatten(state), program.place(batch))

    def gradients(self, state: TrainState, batch: Any) -> Any:
        """The gradients of the loss on one (training) batch under `state`, without
        an update: the trainable part of the model (`None` where frozen), sharded
        like the parameters. For diagnostics (per-layer gradient norms)."""
        program = _program(self, state, batch, "grads")
        return program.run(program.flatten(state), program.place(batch))


# --- compiled programs ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledStep:
    """One compiled training (or evaluation) program and the layouts it was built
    for. Immutable; built by `TrainStep.compile`.

    **Fields:**

    - `treedef`, `static_leaves`, `array_index`: the state's structure: its leaves
        are `static_leaves` with the arrays put back at `array_index`.
    - `packed`: which of those arrays (positions in `array_index`) are replicated
        int32 scalars (the step, data position and bad-step counters, Adam's count)
        that travel as one vector at the end of `flatten`'s list.
    - `state_shardings`: the pinned sharding of each array of `flatten`'s list.
    - `mask`: a bool per model leaf: which arrays train.
    - `batch`: the `BatchLayout` every batch must have.
    - `run`: the jitted `(arrays, batch_leaves) -> (arrays, metrics)` over
        `flatten`'s list (training; the state arrays are donated; the metrics are a
        dict, or one float32 vector when packed: see `metrics`) or `-> metrics`
        (evaluation).
    - `metric_names`: for a packed program, the names of its metrics vector's
        entries, filled in when it is traced (they come from the loss); None when
        the metrics come as a dict.
    """

    treedef: Any
    static_leaves: tuple[Any, ...]
    array_index: tuple[int, ...]
    packed: tuple[int, ...]
    state_shardings: tuple[NamedSharding, ...]
    mask: tuple[bool, ...]
    batch: BatchLayout
    run: Any
    metric_names: MetricNames | None = None

    def flatten(self, state: TrainState) -> list[Any]:
        """The state's arrays as a flat list (the program's own representation).

        The int32 counters are stacked into one vector: every argument and result of
        the step costs the host a buffer per device at each dispatch, so one vector
        instead of six scalars saves tens of buffers per step on a multi-device mesh.
        """
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self.treedef:
            raise TrainerError(
                "Expected a TrainState with the structure this step was compiled for, "
                "got a different one.",
                suggestion="Use the state returned by `init` or by the previous step.",
            )
        return self.arrays_of(leaves)

    def arrays_of(self, leaves: list[Any]) -> list[Any]:
        """`flatten` of a state's leaves (no structure check)."""
        arrays = [leaves[i] for i in self.array_index]
        if not self.packed:
            return arrays
        scalars = [arrays[j] for j in self.packed]
        skip = set(self.packed)
        rest = [x for j, x in enumerate(arrays) if j not in skip]
        return [*rest, _stack(scalars, self.state_shardings[-1])]

    def unflatten(self, arrays: list[Any]) -> TrainState:
        """The inverse of `flatten`."""
        arrays = list(arrays)
        if self.packed:
            vector = arrays.pop()
            scalars = _unstack(vector, len(self.packed), self.state_shardings[-1])
            for j, x in zip(self.packed, scalars, strict=True):
                arrays.insert(j, x)  # `packed` ascends: each lands at its position
        leaves = list(self.static_leaves)
        for i, x in zip(self.array_index, arrays, strict=True):
            leaves[i] = x
        return jax.tree.unflatten(self.treedef, leaves)

    def leaves(self, batch: Any) -> list[Any]:
        """`batch`'s leaves checked against `self.batch` (see `BatchLayout.leaves`).

        On one process numpy leaves stay on the host: the step's own dispatch copies
        them to the devices (cheaper than a separate placement, and still while the
        previous step runs, since dispatch is asynchronous). Other leaves (e.g.
        arrays on one device) are placed first."""
        leaves = self.batch.leaves(batch)
        if not self.batch.many_processes:
            for x in leaves:
                if type(x) is not np.ndarray:
                    return place_leaves(leaves, list(self.batch.shardings))
        return leaves

    def place(self, batch: Any) -> list[jax.Array]:
        """`batch`'s leaves, checked and placed on the devices."""
        leaves = self.batch.leaves(batch)
        if self.batch.many_processes:
            return leaves  # already global arrays
        return place_leaves(leaves, list(self.batch.shardings))

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One step on a state and a host batch."""
        arrays, metrics = self.run(self.flatten(state), self.leaves(batch))
        return self.unflatten(arrays), self.metrics(metrics)

    def metrics(self, metrics: Any) -> dict[str, jax.Array]:
        """A training step's metrics as a dict of float32 scalars (on device): a
        packed program's vector (the loss, the gradient norm, the loss's own
        metrics, ...) unstacked; a dict as it is."""
        if self.metric_names is None:
            return metrics
        names = self.metric_names.get()
        values = _unstack(metrics, len(names), metrics.sharding)
        return dict(zip(names, values, strict=True))

    def host_metrics(self, metrics: Any) -> dict[str, float]:
        """`metrics`, fetched: Python floats (waits for the step)."""
        if self.metric_names is None:
            return {k: float(v) for k, v in jax.device_get(metrics).items()}
        values = np.asarray(jax.device_get(metrics)).tolist()
        return dict(zip(self.metric_names.get(), values, strict=True))

    def lower(self, arrays: list[jax.Array], batch_leaves: list[Any]) -> Any:
        """The lowered program for these flat arguments."""
        return self.run.lower(arrays, batch_leaves)


class MetricNames:
    """The names of a training program's metrics, in the order of its metrics
    vector. They come from the loss, so they are known once the program has been
    traced (by its first call or `lower`); set then, never changed."""

    def __init__(self):
        self._names: tuple[str, ...] | None = None

    def set(self, names: tuple[str, ...]) -> None:
        assert self._names in (None, names), (self._names, names)
        self._names = names

    def get(self) -> tuple[str, ...]:
        if self._names is None:
            raise TrainerError(
                "Expected a training program that has run or been lowered, got one "
                "that was never traced: its metric names are not known yet.",
                suggestion="Call the step (or `lower` it) before reading its metrics.",
            )
        return self._names


def _stack(scalars: list[Any], sharding: NamedSharding) -> Any:
    """Scalars -> one vector (inside the step, the inlined program traces), or a
    `ShapeDtypeStruct` for an abstract state."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in scalars):
        return jax.ShapeDtypeStruct((len(scalars),), jnp.int32, sharding=sharding)
    return _stack_program(sharding)(scalars)


def _unstack(vector: Any, n: int, sharding: NamedSharding) -> list[Any]:
    """The inverse of `_stack`."""
    if isinstance(vector, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct((), vector.dtype, sharding=sharding)] * n
    return list(_unstack_program(sharding, n)(vector))


@functools.cache
def _stack_program(sharding: NamedSharding) -> Any:
    return jax.jit(jnp.stack, out_shardings=sharding)


@functools.cache
def _unstack_program(sharding: Any, n: int) -> Any:
    def unstack(vector: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(vector[i] for i in range(n))

    return jax.jit(unstack, out_shardings=sharding)


def _packed_counters(
    leaves: list[Any], array_index: tuple[int, ...], shardings: tuple[Any, ...]
) -> tuple[int, ...]:
    """Positions (in `array_index`) of the replicated int32 scalars, if several."""
    packed = tuple(
        j
        for j, i in enumerate(array_index)
        if tuple(leaves[i].shape) == ()
        and leaves[i].dtype == jnp.int32
        and shardings[j].spec == PartitionSpec()
    )
    return packed if len(packed) > 1 else ()


# Programs, per TrainStep and per layout. Like `jax.jit`'s own cache, it belongs to no
# object: a TrainStep stays immutable, and a program is found again for any state and
# batch with the same layout, whatever the order of calls. Entries die with their
# TrainStep.
_PROGRAMS: weakref.WeakKeyDictionary[TrainStep, dict[Any, CompiledStep]] = (
    weakref.WeakKeyDictionary()
)


def _static_key(leaf: Any) -> Any:
    try:
        hash(leaf)
    except TypeError:
        return ("id", id(leaf))
    return leaf


Kind = Literal["train", "fit", "eval", "grads"]


def _program(ts: TrainStep, state: Any, batch: Any, kind: Kind) -> CompiledStep:
    if not isinstance(state, TrainState):
        raise ArgumentError(
            f"Expected a `tx.TrainState` (from `init`), got {describe_value(state)}.",
            suggestion="Build the state with `init(model, key)` first.",
        )
    leaves, treedef = jax.tree.flatten(state)
    batch_leaves, batch_treedef = jax.tree.flatten(batch)
    key = (
        kind,
        treedef,
        tuple(_static_key(x) for x in leaves if not is_arraylike(x)),
        batch_treedef,
        tuple(
            (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x))))
            for x in batch_leaves
        ),
    )
    programs = _PROGRAMS.setdefault(ts, {})
    program = programs.get(key)
    if program is None:
        program = programs[key] = _build(ts, state, leaves, treedef, batch, kind)
    return program


def _build(
    ts: TrainStep,
    state: TrainState,
    leaves: list[Any],
    treedef: Any,
    batch: Any,
    kind: Kind,
) -> CompiledStep:
    """Derive the layouts from `state` and `batch`, check the loss's output once
    (abstractly), and jit the program with pinned shardings."""
    train = kind != "eval"
    layout = BatchLayout.of(batch, ts.plan, ts.mesh, accumulate=train)
    # Arrays, or `ShapeDtypeStruct`s with shardings (`tx.abstract_state`): a program
    # can be built and lowered for a state that was never allocated.
    array_index = tuple(i for i, x in enumerate(leaves) if is_arraylike(x))
    static = tuple(None if is_arraylike(x) else x for x in leaves)
    shardings_ = tuple(_sharding_of(leaves[i], ts.mesh) for i in array_index)
    packed = _packed_counters(leaves, array_index, shardings_) if kind == "fit" else ()
    state_shardings = tuple(s for j, s in enumerate(shardings_) if j not in packed)
    if packed:
        state_shardings += (replicated(ts.mesh),)
    mask = trainable_mask(state.model, ts.trainable)
    skeleton = CompiledStep(
        treedef=treedef,
        static_leaves=static,
        array_index=array_index,
        packed=packed,
        state_shardings=state_shardings,
        mask=mask,
        batch=layout,
        run=None,
        metric_names=MetricNames() if kind == "fit" else None,
    )
    _check_loss(ts, state, layout, kind)
    rep = replicated(ts.mesh)
    in_shardings = (list(state_shardings), list(layout.shardings))
    if kind in ("train", "fit"):
        run = jax.jit(
            _train_fn(ts, skeleton),
            in_shardings=in_shardings,
            out_shardings=(list(state_shardings), rep),
            donate_argnums=(0,) if ts.donate else (),
        )
    elif kind == "eval":
        run = jax.jit(
            _eval_fn(ts, skeleton), in_shardings=in_shardings, out_shardings=rep
        )
    else:  # gradients land like their parameters
        run = jax.jit(_grads_fn(ts, skeleton), in_shardings=in_shardings)
    return dataclasses.replace(skeleton, run=run)


def _sharding_of(x: jax.Array, mesh: Mesh) -> NamedSharding:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding
    # A restored or hand-built scalar on one device: replicate it on the mesh.
    return replicated(mesh)


def _check_loss(ts: TrainStep, state: TrainState, layout: BatchLayout, kind: Kind):
    """Trace the loss once, abstractly, to catch a bad return before compiling.

    Training passes a key (a loss may need one for dropout); evaluation, None."""
    batch = jax.tree.unflatten(
        layout.treedef,
        [
            jax.ShapeDtypeStruct(s, d)
            for s, d in zip(layout.shapes, layout.dtypes, strict=True)
        ],
    )

    params, static = eqx.partition(state.model, is_arraylike)
    train = kind != "eval"

    def run(params: Any, b: Any, rng: Any) -> Any:
        model = eqx.combine(params, static)
        key = jax.random.wrap_key_data(rng) if train else _EVAL_KEY
        out = ts.loss(ts.precision.cast(model), ts.precision.cast(b), key)
        return split_loss_output(out, "`loss`")

    try:
        jax.eval_shape(run, params, batch, state.rng)
    except TitanaxError:
        raise
    except Exception as e:
        raise StepFailedError(
            f"Expected the loss to trace for batches of shapes {layout.shapes}, got "
            f"{type(e).__name__}: {e}",
            suggestion="Fix the loss function (it raised while being traced, before "
            "anything compiled; the state is intact).",
        ) from e


# --- the step's math ------------------------------------------------------------------


def _train_fn(ts: TrainStep, layout: CompiledStep) -> Callable[..., Any]:
    """The pure training step over flat arrays, for `jax.jit`."""
    rows = layout.batch.rows
    guarded = ts.skips_nonfinite

    def train_step(
        arrays: list[jax.Array], batch_leaves: list[jax.Array]
    ) -> tuple[list[jax.Array], Any]:
        state = layout.unflatten(arrays)
        batch = layout.batch.treedef.unflatten(batch_leaves)
        key = jax.random.fold_in(state.key, state.step)
        spec = _mask_spec(state.model, layout.mask)
        trainable, frozen = eqx.partition(state.model, spec)
        scale = state.loss_scale.scale if state.loss_scale is not None else None
        grads, loss, metrics = _loss_and_grads(
            ts, spec, trainable, frozen, batch, key, scale
        )
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if guarded:
            # A skipped step changes nothing but the counters (and fp16's scale).
            # `lax.cond` runs the update only for a finite step; a select of new
            # against old values (`jnp.where`) adds a pass over the parameters and
            # optimizer state and copies of the donated buffers (6.3M-parameter MLP:
            # 14 copies and 64 MiB of scratch memory instead of 1 and 24 MiB).
            def update(operands: Any) -> Any:
                grads, opt_state, params = operands
                updates, opt_state = ts.optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            def keep(operands: Any) -> Any:
                _, opt_state, params = operands
                return params, opt_state

            operands = (grads, state.opt_state, trainable)
            new_trainable, opt_state = jax.lax.cond(finite, update, keep, operands)
        else:
            # "raise" without loss scaling: the step applies as computed and the
            # Trainer stops at the next log step or checkpoint.
            updates, opt_state = ts.optimizer.update(grads, state.opt_state, trainable)
            new_trainable = optax.apply_updates(trainable, updates)
        # Under loss scaling, overflowing gradients with a finite loss are the
        # scaler's ordinary work (it halves the scale); only a bad loss is "bad".
        bad = ~finite if scale is None else ~jnp.isfinite(loss)
        new_state = TrainState(
            model=eqx.combine(new_trainable, frozen),
            opt_state=opt_state,
            step=state.step + 1,
            rng=state.rng,
            data_position=state.data_position + rows,
            loss_scale=(
                ts.precision.next_loss_scale(state.loss_scale, finite)
                if state.loss_scale is not None
                else None
            ),
            bad_steps=state.bad_steps + bad.astype(jnp.int32),
            first_bad_step=jnp.where(
                bad & (state.first_bad_step < 0), state.step, state.first_bad_step
            ),
            bad_streak=jnp.where(bad, state.bad_streak + 1, 0),
        )
        out = {"loss": loss, "grad_norm": grad_norm, **metrics}
        lr = current_lr(opt_state)
        if lr is not None:
            out["lr"] = jnp.asarray(lr, jnp.float32)
        if scale is not None:
            out["loss_scale"] = scale
        arrays = layout.arrays_of(jax.tree.leaves(new_state))
        if layout.metric_names is None:
            return arrays, out
        layout.metric_names.set(tuple(out))
        return arrays, jnp.stack([jnp.asarray(v, jnp.float32) for v in out.values()])

    return train_step


def _grads_fn(ts: TrainStep, layout: CompiledStep) -> Callable[..., Any]:
    def grads_step(arrays: list[jax.Array], batch_leaves: list[jax.Array]) -> Any:
        state = layout.unflatten(arrays)
        batch = layout.batch.treedef.unflatten(batch_leaves)
        key = jax.random.fold_in(state.key, state.step)
        spec = _mask_spec(state.model, layout.mask)
        trainable, frozen = eqx.partition(state.model, spec)
        scale = state.loss_scale.scale if state.loss_scale is not None else None
        grads, _, _ = _loss_and_grads(ts, spec, trainable, frozen, batch, key, scale)
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        return grads

    return grads_step


def _eval_fn(ts: TrainStep, layout: CompiledStep) -> Callable[..., Any]:
    def eval_step(
        arrays: list[jax.Array], batch_leaves: list[jax.Array]
    ) -> dict[str, jax.Array]:
        state = layout.unflatten(arrays)
        batch = layout.batch.treedef.unflatten(batch_leaves)
        model = ts.precision.cast(state.model)
        loss, metrics = split_loss_output(
            ts.loss(model, ts.precision.cast(batch), _EVAL_KEY), "`loss`"
        )
        return {"loss": loss, **metrics}

    return eval_step


def _loss_and_grads(
    ts: TrainStep,
    spec: Any,
    trainable: Any,
    frozen: Any,
    batch: Any,
    key: jax.Array,
    scale: Any,
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    precision = ts.precision

    def objective(params: Any, b: Any, k: jax.Array) -> Any:
        model = precision.cast(eqx.combine(params, frozen))
        loss, metrics = split_loss_output(
            ts.loss(model, precision.cast(b), k), "`loss`"
        )
        scaled = loss * scale if scale is not None else loss
        return scaled, (loss, metrics)

    if ts.mode == "spmd":
        return _spmd_loss_and_grads(ts, objective, trainable, batch, key)
    if ts.plan.pp is not None:
        return _pipeline_loss_and_grads(ts, spec, trainable, frozen, batch, key, scale)
    grad_fn = jax.grad(objective, has_aux=True)
    steps = ts.plan.accumulate_steps
    if steps == 1:
        grads, (loss, metrics) = grad_fn(trainable, batch, key)
        return grads, loss, metrics
    return _accumulate(ts, grad_fn, trainable, batch, key, steps)


def _pipeline_loss_and_grads(
    ts: TrainStep,
    spec: Any,
    trainable: Any,
    frozen: Any,
    batch: Any,
    key: jax.Array,
    scale: Any,
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    # Microbatches replace accumulation: the executor runs the plan's schedule
    # (GPipe or 1F1B) and reduces over the data axes once.
    assert ts.stage is not None
    model = ts.precision.cast(eqx.combine(trainable, frozen))
    loss, metrics, grads = pipeline_value_and_grad(
        ts.stage,
        model,
        ts.precision.cast(batch),
        key,
        plan=ts.plan,
        mesh=ts.mesh,
        scale=scale,
    )
    grads = eqx.filter(grads, spec)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    metrics = {n: v.astype(jnp.float32) for n, v in metrics.items()}
    return grads, loss.astype(jnp.float32), metrics


def _spmd_loss_and_grads(
    ts: TrainStep, objective: Any, trainable: Any, batch: Any, key: jax.Array
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    # The loss runs per device on its shard of the batch; `tx.value_and_grad` gives
    # local gradients (parameters marked varying first: no N× trap), which are
    # accumulated locally over microbatches and reduced once with `pmean`.
    axes = ts.plan.data_axes
    steps = ts.plan.accumulate_steps

    def reduce(tree: Any) -> Any:
        if not axes:
            return tree
        return collectives.pmean(collectives.pvary(tree, axes), axes)

    def body(params: Any, local_batch: Any, k: jax.Array) -> Any:
        if axes:
            k = jax.random.fold_in(k, jax.lax.axis_index(axes))
        grad_fn = value_and_grad(lambda p, b, kk: objective(p, b, kk), has_aux=True)
        if steps == 1:
            (_, (loss, metrics)), grads = grad_fn(params, local_batch, k)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(steps, x.shape[0] // steps, *x.shape[1:]),
                local_batch,
            )  # (K, b, ...)

            def one(i: jax.Array) -> Any:
                b = jax.tree.map(lambda x: x[i], micro)
                (_, aux), g = grad_fn(params, b, jax.random.fold_in(k, i))
                return g, aux[0], aux[1]

            def add(acc: Any, i: jax.Array) -> Any:
                return jax.tree.map(jnp.add, acc, one(i)), None

            first = one(jnp.asarray(0))
            total, _ = jax.lax.scan(add, first, jnp.arange(1, steps))
            grads, loss, metrics = jax.tree.map(lambda x: x / steps, total)
        return reduce(grads), reduce(loss), reduce(metrics)

    grad_specs = spmd_specs(trainable, ts.plan, ts.mesh)
    run = spmd(
        body,
        ts.plan,
        ts.mesh,
        in_specs=(None, None, PartitionSpec()),
        out_specs=(grad_specs, PartitionSpec(), PartitionSpec()),
    )
    return run(trainable, batch, key)


def _accumulate(
    ts: TrainStep, grad_fn: Any, trainable: Any, batch: Any, key: jax.Array, steps: int
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    # Accumulate per data shard and reduce once: a plain scan over microbatches of
    # the global batch would all-reduce gradients K times. So the batch gets an
    # explicit leading dim D over the pure-DP axis; each shard scans its K
    # microbatches locally (vmap), and the mean over D is the one reduction.
    plan, mesh = ts.plan, ts.mesh
    dp, fsdp = plan.dp, plan.fsdp
    pure_dp = dp is not None and (fsdp is None or fsdp.axis != dp.axis)
    shards = mesh.shape[dp.axis] if pure_dp and dp is not None else 1
    # The D dim lives on the pure-DP axis; within a shard, FSDP's axis (or, with no
    # pure-DP axis, every data axis) still splits each microbatch's rows.
    outer = dp.axis if pure_dp and dp is not None else None
    inner_axes = tuple(a for a in plan.data_axes if a != outer)
    inner = inner_axes[0] if len(inner_axes) == 1 else (inner_axes or None)
    spec = PartitionSpec(outer, None, inner)

    def split(x: jax.Array) -> jax.Array:
        micro = x.shape[0] // (shards * steps)
        x = x.reshape(shards, steps, micro, *x.shape[1:])  # (D, K, b, ...)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def one_shard(shard_batch: Any, shard: jax.Array) -> Any:
        def body(acc: Any, inputs: Any) -> Any:
            micro_batch, index = inputs
            k = jax.random.fold_in(jax.random.fold_in(key, shard), index)
            grads, (loss, metrics) = grad_fn(trainable, micro_batch, k)
            return jax.tree.map(jnp.add, acc, (grads, loss, metrics)), None

        first = jax.tree.map(lambda x: x[0], shard_batch)
        shapes = jax.eval_shape(lambda b: grad_fn(trainable, b, key), first)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            (shapes[0], shapes[1][0], shapes[1][1]),
        )
        total, _ = jax.lax.scan(body, zeros, (shard_batch, jnp.arange(steps)))
        return jax.tree.map(lambda x: x / steps, total)

    split_batch = jax.tree.map(split, batch)
    per_shard = jax.vmap(one_shard)(split_batch, jnp.arange(shards))
    grads, loss, metrics = jax.tree.map(lambda x: jnp.mean(x, 0), per_shard)
    return grads, loss, metrics


def make_train_step(
    loss: LossFn,
    optimizer: optax.GradientTransformation,
    plan: Plan,
    mesh: Mesh,
    *,
    trainable: Trainable | None = None,
    precision: Precision | None = None,
    on_nonfinite: Literal["raise", "skip"] = "raise",
    donate: bool = True,
    mode: Literal["jit", "spmd"] = "jit",
    stage: Stage | None = None,
) -> TrainStep:
    """Build a compiled training step, for users who keep their own loop.

    **Arguments:**

    - `loss`: `loss(model, batch, key) -> loss` or `-> (loss, metrics_dict)`; `loss`
        and metrics are scalars. `key` is a per-step (and per-microbatch) PRNG key;
        evaluation passes `None`.
    - `optimizer`: an Optax transformation (e.g. `tx.optim.adamw(...)`).
    - `plan`, `mesh`: the parallel layout.
    - `trainable`: which arrays train: `None` (all), an Equinox filter spec, or
        `(path, leaf) -> bool`. Frozen arrays get no gradient and no optimizer state.
    - `precision`: a `tx.Precision` (default fp32).
    - `on_nonfinite`: what a step whose loss or gradient norm is not finite does.
        The state always counts such steps (`bad_steps`, `first_bad_step`,
        `bad_streak`). `"raise"` (default): the step applies as computed (no extra
        device work) and `tx.Trainer` raises `NonFiniteError` at the next log step or
        checkpoint, naming it; it never saves a checkpoint after it. `"skip"`: the
        step changes nothing but the counters (a select over parameters and optimizer
        state, about one extra pass over them per step) and training goes on. With
        fp16 loss scaling, non-finite steps are always skipped (the scaler lowers
        the scale).
    - `donate`: donate the old state's buffers to the new one (default True).
    - `mode`: `"jit"` (default): the loss sees the global batch and XLA partitions
        it. `"spmd"`: the loss runs per device on its shard of the batch (inside
        `tx.spmd`) and may call `tx.collectives`; gradients are local, accumulated
        locally and `pmean`-ed once over the data axes. DP plans only.
    - `stage`: with a `PP` plan, the `tx.Stage` saying where the stacked layers are
        and what runs before (`pre`) and after them (`post`, which gives the training
        loss). `loss` is then used by `evaluate` only.

    **Returns:** a `TrainStep`; `init, step = tx.make_train_step(...)` also works.
    Each step adds one to `state.step` and the global batch size to
    `state.data_position`.

    **Raises:** `ArgumentError`, `PlanError` or `PipelineError` for a bad argument,
    before anything is compiled; `BatchError` for a batch that does not fit.

    !!! Example
        ```python
        init, step = tx.make_train_step(loss, tx.optim.adamw(1e-3), plan, mesh)
        state = init(model, jax.random.key(0))
        for batch in data:
            state, metrics = step(state, batch)
        ```
    """
    return TrainStep(
        loss,
        optimizer,
        plan,
        mesh,
        trainable=trainable,
        precision=precision,  # type: ignore[arg-type]
        on_nonfinite=on_nonfinite,
        donate=donate,
        mode=mode,
        stage=stage,
    )
