"""`tx.make_train_step`: the compiled, sharded, donated training step.

The step is a `jax.jit` over the flat list of the TrainState's arrays (the static
half is closed over; the treedef is computed once), with `in_shardings` and
`out_shardings` pinned from the plan and the state donated. Not `eqx.filter_jit`: it
blocks the host on every call and refuses shardings (see `jax-notes.md`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._axes import path_str
from .._errors import PipelineError, TrainerError
from .._plan import Plan
from .._sharding import init as sharded_init
from .._sharding import shard, shardings
from ..optim import current_lr
from ..parallel import collectives, spmd, spmd_specs, value_and_grad
from ..parallel.pipeline import Stage, pipeline_value_and_grad
from ._batch import (
    BatchSpec,
    _leaf_paths,
    batch_shardings,
    check_batch_divides,
    global_array,
    place_leaves,
    put_batch,
    replicated,
)
from ._precision import Precision
from ._state import TrainState

__all__ = ["LossFn", "TrainStep", "make_train_step"]

LossFn = Callable[[Any, Any, jax.Array | None], Any]
Trainable = Any  # an Equinox filter spec PyTree, or (path: str, leaf) -> bool
_EVAL_KEY = None  # evaluation runs the loss with key=None: no dropout


def _split_loss_output(out: Any, where: str) -> tuple[jax.Array, dict[str, Any]]:
    loss: Any
    metrics: Any
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if not hasattr(loss, "shape") or tuple(loss.shape) != ():
        shape = getattr(loss, "shape", type(loss).__name__)
        raise TrainerError(
            f"{where} must return a scalar loss (or `(loss, metrics_dict)`), got a "
            f"loss of shape {shape}.",
            suggestion="Reduce the loss over the batch, e.g. `jnp.mean(per_example)`.",
        )
    for name, value in metrics.items():
        if not hasattr(value, "shape") or tuple(value.shape) != ():
            raise TrainerError(
                f"{where} returned metric `{name}` of shape "
                f"{getattr(value, 'shape', type(value).__name__)}; metrics must be "
                "scalars.",
                suggestion=f"Reduce `{name}` to a scalar (e.g. its batch mean).",
            )
    return loss, dict(metrics)


def _check_mode(mode: str, plan: Plan) -> None:
    if mode not in ("jit", "spmd"):
        raise TrainerError(
            f'`mode` must be "jit" or "spmd", got {mode!r}.',
            suggestion='Use mode="jit" (compiler-partitioned) or mode="spmd".',
        )
    if mode == "spmd" and any(p is not None for p in (plan.fsdp, plan.tp, plan.pp)):
        raise TrainerError(
            f'mode="spmd" runs the loss per device for data parallelism; the plan '
            f"({plan.describe()}) also shards parameters.",
            suggestion=(
                'Use mode="jit" for FSDP/TP/PP plans, or write the whole step with '
                "`tx.spmd` and `tx.collectives` yourself."
            ),
        )


def _check_stage(stage: Any, plan: Plan) -> None:
    if plan.pp is None:
        if stage is not None:
            raise PipelineError(
                "`stage=` was given, but the plan has no `pp`.",
                suggestion="Add `pp=tx.PP(...)` to the plan, or drop `stage=`.",
            )
        return
    if not isinstance(stage, Stage):
        raise PipelineError(
            f"The plan pipelines ({plan.describe()}), so the step needs a "
            f"`tx.Stage` describing the model's pipelined stack; got {stage!r}.",
            suggestion=(
                "Pass `stage=tx.Stage(where=lambda m: m.blocks, pre=..., post=...)`; "
                "see docs/pipeline.md."
            ),
        )
    if plan.accumulate_steps > 1:
        raise PipelineError(
            f"`DP(accumulate_steps={plan.accumulate_steps})` with PP: pipeline "
            "microbatches replace gradient accumulation.",
            suggestion="Use `PP(microbatches=...)` and `DP(accumulate_steps=1)`.",
        )


def resolve_trainable(model: Any, trainable: Trainable | None) -> Any:
    """A bool per leaf of `model`: True for arrays that train.

    **Arguments:**

    - `model`: the model.
    - `trainable`: `None` (every array), an Equinox filter spec PyTree (as for
        `eqx.partition`), or a callable `(path, leaf) -> bool` where `path` reads like
        `GPT.blocks.w_qkv`.

    **Raises:** `TrainerError` if nothing would train.
    """
    if trainable is None:
        spec: Any = eqx.is_array
    elif callable(trainable) and not isinstance(trainable, eqx.Module):
        spec = jax.tree_util.tree_map_with_path(
            lambda p, x: eqx.is_array(x) and bool(trainable(path_str(model, p), x)),
            model,
        )
    else:
        spec = trainable
    chosen, _ = eqx.partition(model, spec)
    mask = jax.tree.map(
        lambda x: x is not None and eqx.is_array(x), chosen, is_leaf=lambda x: x is None
    )
    if not any(jax.tree.leaves(mask)):
        raise TrainerError(
            "The trainable set is empty: `trainable` selects no array of the model.",
            suggestion=(
                "Pass a filter that selects at least one parameter, e.g. "
                "`trainable=lambda path, x: 'head' in path`."
            ),
        )
    return mask


class TrainStep:
    """A compiled training step and the functions around it.

    Built by `tx.make_train_step`. Unpacks as `init, step = tx.make_train_step(...)`.

    **Methods:**

    - `init(model, key) -> TrainState`: place the model (or build it sharded, if
        `model` is a `key -> Module` function), create the optimizer state with pinned
        shardings, and return the `TrainState`.
    - `step(state, batch) -> (state, metrics)`: one optimizer step. `batch` is a host
        (numpy) PyTree, or the same PyTree of `jax.Array`s. The old state is donated.
    - `put_batch(batch)`: place a host batch over the data axes; returns its flat
        leaves, for `step_flat`.
    - `step_flat(arrays, leaves)`: `step` on `flatten(state)` and the leaves from
        `put_batch` or `step_batch` (no PyTree work on the host).
    - `evaluate(state, batch) -> metrics`: the loss and metrics without an update.
    - `lower(state, batch)`: the `jax.stages.Lowered` step, for HLO inspection.
    """

    def __init__(
        self,
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
    ):
        if not callable(loss):
            raise TrainerError(
                f"`loss` must be a function `(model, batch, key) -> loss`, got "
                f"{type(loss).__name__}.",
                suggestion="Pass e.g. `loss=lambda model, batch, key: ...`.",
            )
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TrainerError(
                f"`optimizer` must be an optax.GradientTransformation, got "
                f"{type(optimizer).__name__}.",
                suggestion="Use e.g. `tx.optim.adamw(1e-3)` or `optax.sgd(0.1)`.",
            )
        if on_nonfinite not in ("raise", "skip"):
            raise TrainerError(
                f'`on_nonfinite` must be "raise" or "skip", got {on_nonfinite!r}.',
                suggestion='Use "raise" (default) or "skip".',
            )
        if not isinstance(plan, Plan):
            raise TrainerError(
                f"`plan` must be a `tx.Plan`, got {type(plan).__name__}.",
                suggestion="Use e.g. `tx.Plan(dp=tx.DP())`.",
            )
        plan.check_mesh(mesh)
        _check_mode(mode, plan)
        _check_stage(stage, plan)
        self.mode = mode
        self.stage = stage
        self.loss = loss
        self.optimizer = optimizer
        self.plan = plan
        self.mesh = mesh
        self.trainable = trainable
        self.precision = precision if precision is not None else Precision.fp32()
        self.on_nonfinite = on_nonfinite
        self._donate = donate
        self._treedef: Any = None
        self._static_leaves: list[Any] = []
        self._array_index: list[int] = []
        self._state_shardings: list[NamedSharding] = []
        self._params_replicated = False
        self._mask: Any = None
        self._batch_spec: BatchSpec | None = None
        self._batch_shardings: list[NamedSharding] = []
        self._jitted: Any = None
        self._jitted_eval: Any = None
        self._one_process = jax.process_count() == 1

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter((self.init, self.step))

    # --- state ----------------------------------------------------------------------

    def init(self, model: Any, key: jax.Array | int = 0) -> TrainState:
        """Build the sharded `TrainState` (see the class docstring)."""
        key = jax.random.key(key) if isinstance(key, int) else key
        model_key, run_key = jax.random.split(key)
        if callable(model) and not isinstance(model, eqx.Module):
            model = sharded_init(model, model_key, self.plan, self.mesh)
        else:
            model = shard(model, self.plan, self.mesh)
        self._mask = resolve_trainable(model, self.trainable)
        trainable = eqx.filter(model, self._mask)
        opt_state = self._init_opt_state(model, trainable)
        rep = replicated(self.mesh)

        def scalar(value: int, dtype: Any) -> jax.Array:
            return jax.device_put(jnp.asarray(value, dtype), rep)

        loss_scale = self.precision.initial_loss_scale()
        state = TrainState(
            model=model,
            opt_state=opt_state,
            step=scalar(0, jnp.int32),
            rng=jax.device_put(jax.random.key_data(run_key), rep),
            data_position=scalar(0, jnp.int32),
            loss_scale=jax.device_put(loss_scale, rep) if loss_scale else None,
            bad_steps=scalar(0, jnp.int32),
            first_bad_step=scalar(-1, jnp.int32),
        )
        self._bind(state)
        return state

    def _init_opt_state(self, model: Any, trainable: Any) -> Any:
        # Pin the optimizer state's shardings to its parameters' (jax-notes: a plain
        # `jit(opt.init)` puts Adam moments whole on one device).
        param_shardings = eqx.filter(shardings(model, self.plan, self.mesh), self._mask)
        abstract = jax.eval_shape(self.optimizer.init, trainable)
        opt_shardings = optax.tree_map_params(
            self.optimizer,
            lambda _, sharding: sharding,
            abstract,
            param_shardings,
            transform_non_params=lambda _: replicated(self.mesh),
            is_leaf=lambda x: x is None,
        )
        return jax.jit(self.optimizer.init, out_shardings=opt_shardings)(trainable)

    def _bind(self, state: TrainState) -> None:
        """Remember the state's structure and shardings; (re)build the step."""
        leaves, treedef = jax.tree.flatten(state)
        self._treedef = treedef
        self._array_index = [i for i, x in enumerate(leaves) if eqx.is_array(x)]
        self._static_leaves = [None if eqx.is_array(x) else x for x in leaves]
        self._state_shardings = [leaves[i].sharding for i in self._array_index]
        self._params_replicated = all(
            x.sharding.is_fully_replicated
            for x in jax.tree.leaves(state.model)
            if eqx.is_array(x)
        )
        if self._mask is None:
            self._mask = resolve_trainable(state.model, self.trainable)
        self._jitted = None
        self._jitted_eval = None

    def flatten(self, state: TrainState) -> list[jax.Array]:
        """The state's arrays as a flat list (the step's own representation)."""
        if self._treedef is None:
            self._mask = None
            self._bind(state)
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self._treedef:
            raise TrainerError(
                "This TrainState's structure differs from the one the step was built "
                "for.",
                suggestion="Use the state returned by `init` or by the previous step.",
            )
        return [leaves[i] for i in self._array_index]

    def unflatten(self, arrays: list[jax.Array]) -> TrainState:
        """The inverse of `flatten`."""
        leaves = list(self._static_leaves)
        for i, x in zip(self._array_index, arrays, strict=True):
            leaves[i] = x
        return jax.tree.unflatten(self._treedef, leaves)

    @property
    def state_shardings(self) -> list[NamedSharding]:
        """The pinned sharding of each array of the state, in `flatten` order."""
        return list(self._state_shardings)

    # --- batches --------------------------------------------------------------------

    def put_batch(self, batch: Any) -> list[jax.Array]:
        """Check a batch against the first one and place it; returns flat leaves."""
        leaves = self._checked_leaves(batch)
        if self._one_process:
            return place_leaves(leaves, self._batch_shardings)
        return leaves

    def step_batch(self, batch: Any) -> list[Any]:
        """Check a batch against the first one; returns the flat leaves `step_flat`
        takes. On one process, numpy leaves stay on the host: the jitted step's own
        dispatch copies them to the devices (cheaper than a separate placement, and
        still while the previous step runs, since dispatch is asynchronous).

        Keep to one kind per run: jit keys its cache on whether inputs are already
        placed, so alternating with `put_batch`'s placed leaves compiles twice."""
        leaves = self._checked_leaves(batch)
        if self._one_process:
            for x in leaves:
                if type(x) is not np.ndarray:
                    return place_leaves(leaves, self._batch_shardings)
        return leaves

    def _checked_leaves(self, batch: Any) -> list[Any]:
        """The batch's leaves, checked against the first batch's structure (which
        the first call records). On many hosts, the leaves are already the global
        arrays built from each process's rows."""
        leaves, treedef = jax.tree.flatten(batch)
        first = self._batch_spec is None
        if self._batch_spec is None:
            leaves = [x if hasattr(x, "shape") else np.asarray(x) for x in leaves]
            if self._one_process:  # else: check the global shapes below
                check_batch_divides(batch, self.plan, self.mesh)
            self._batch_spec = BatchSpec(
                treedef=treedef,
                shapes=tuple(tuple(x.shape) for x in leaves),
                dtypes=tuple(np.dtype(x.dtype) for x in leaves),
                paths=_leaf_paths(batch),
            )
            self._batch_shardings = batch_shardings(leaves, self.plan, self.mesh)
        else:
            self._batch_spec.check(treedef, leaves)
        if self._one_process:
            return leaves
        placed = [
            global_array(x, s)
            for x, s in zip(leaves, self._batch_shardings, strict=True)
        ]
        if first:  # each process holds only its own rows: check the global batch
            try:
                check_batch_divides(treedef.unflatten(placed), self.plan, self.mesh)
            except TrainerError:
                self._batch_spec = None
                raise
        return placed

    # --- the step -------------------------------------------------------------------

    def _check_loss(
        self, arrays: list[jax.Array], batch: list[jax.Array], train: bool = True
    ) -> None:
        """Trace the loss once, abstractly, to catch a bad return before compiling.

        Training passes a key (a loss may need one for dropout); evaluation, None."""
        state = self.unflatten(arrays)
        assert self._batch_spec is not None
        one = self._batch_spec.treedef.unflatten(batch)

        def run(model: Any, b: Any, key: Any) -> Any:
            return self.loss(self.precision.cast(model), self.precision.cast(b), key)

        key = state.key if train else _EVAL_KEY
        out = eqx.filter_eval_shape(run, state.model, one, key)
        _split_loss_output(out, "`loss`")

    def _build(self, arrays: list[jax.Array], batch: list[jax.Array]) -> None:
        self._check_loss(arrays, batch)
        rep = replicated(self.mesh)
        self._jitted = jax.jit(
            self._train_step,
            in_shardings=(self._state_shardings, self._batch_shardings),
            out_shardings=(self._state_shardings, rep),
            donate_argnums=(0,) if self._donate else (),
        )

    @property
    def compiles_next_step(self) -> bool:
        """Whether the next `step` builds and compiles the step function."""
        return self._jitted is None

    def step_flat(
        self, arrays: list[jax.Array], batch: list[jax.Array]
    ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
        """`step` on `flatten(state)` and the leaves from `step_batch` or
        `put_batch` (no PyTree work on the host)."""
        if self._jitted is None:
            self._build(arrays, batch)
        jitted: Any = self._jitted
        return jitted(arrays, batch)

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One optimizer step; returns the new state and on-device metrics."""
        arrays = self.flatten(state)
        new_arrays, metrics = self.step_flat(arrays, self.step_batch(batch))
        return self.unflatten(new_arrays), metrics

    __call__ = step

    def lower(self, state: TrainState, batch: Any) -> Any:
        """The lowered step (`.compile().as_text()` gives its HLO)."""
        arrays = self.flatten(state)
        placed = self.put_batch(batch)
        if self._jitted is None:
            self._build(arrays, placed)
        jitted: Any = self._jitted
        return jitted.lower(arrays, placed)

    def _loss_and_grads(
        self, trainable: Any, frozen: Any, batch: Any, key: jax.Array, scale: Any
    ) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
        precision = self.precision

        def objective(params: Any, b: Any, k: jax.Array) -> Any:
            model = precision.cast(eqx.combine(params, frozen))
            loss, metrics = _split_loss_output(
                self.loss(model, precision.cast(b), k), "`loss`"
            )
            loss = loss.astype(jnp.float32)
            metrics = {n: v.astype(jnp.float32) for n, v in metrics.items()}
            scaled = loss * scale if scale is not None else loss
            return scaled, (loss, metrics)

        if self.mode == "spmd":
            return self._spmd_loss_and_grads(objective, trainable, batch, key)
        if self.plan.pp is not None:
            return self._pipeline_loss_and_grads(trainable, frozen, batch, key, scale)
        grad_fn = jax.grad(objective, has_aux=True)
        steps = self.plan.accumulate_steps
        if steps == 1:
            grads, (loss, metrics) = grad_fn(trainable, batch, key)
            return grads, loss, metrics
        return self._accumulate(grad_fn, trainable, batch, key, steps)

    def _pipeline_loss_and_grads(
        self, trainable: Any, frozen: Any, batch: Any, key: jax.Array, scale: Any
    ) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
        # Microbatches replace accumulation: the executor runs the plan's schedule
        # (GPipe or 1F1B) and reduces over the data axes once.
        assert self.stage is not None
        model = self.precision.cast(eqx.combine(trainable, frozen))
        loss, metrics, grads = pipeline_value_and_grad(
            self.stage,
            model,
            self.precision.cast(batch),
            key,
            plan=self.plan,
            mesh=self.mesh,
            scale=scale,
        )
        grads = eqx.filter(grads, self._mask)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
        metrics = {n: v.astype(jnp.float32) for n, v in metrics.items()}
        return grads, loss.astype(jnp.float32), metrics

    def _spmd_loss_and_grads(
        self, objective: Any, trainable: Any, batch: Any, key: jax.Array
    ) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
        # The loss runs per device on its shard of the batch; `tx.value_and_grad`
        # gives local gradients (parameters marked varying first: no N× trap), which
        # are accumulated locally over microbatches and reduced once with `pmean`.
        axes = self.plan.data_axes
        steps = self.plan.accumulate_steps

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

        grad_specs = spmd_specs(trainable, self.plan, self.mesh)
        run = spmd(
            body,
            self.plan,
            self.mesh,
            in_specs=(None, None, PartitionSpec()),
            out_specs=(grad_specs, PartitionSpec(), PartitionSpec()),
        )
        return run(trainable, batch, key)

    def _accumulate(
        self, grad_fn: Any, trainable: Any, batch: Any, key: jax.Array, steps: int
    ) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
        # Accumulate per data shard and reduce once: a plain scan over microbatches of
        # the global batch would all-reduce gradients K times (jax-notes). So the
        # batch gets an explicit leading dim D over the pure-DP axis; each shard scans
        # its K microbatches locally (vmap), and the mean over D is the one reduction.
        dp, fsdp = self.plan.dp, self.plan.fsdp
        pure_dp = dp is not None and (fsdp is None or fsdp.axis != dp.axis)
        shards = self.mesh.shape[dp.axis] if pure_dp and dp is not None else 1
        # The D dim lives on the pure-DP axis; within a shard, FSDP's axis (or, with
        # no pure-DP axis, every data axis) still splits each microbatch's rows.
        outer = dp.axis if pure_dp and dp is not None else None
        inner_axes = tuple(a for a in self.plan.data_axes if a != outer)
        inner = inner_axes[0] if len(inner_axes) == 1 else (inner_axes or None)
        spec = PartitionSpec(outer, None, inner)

        def split(x: jax.Array) -> jax.Array:
            micro = x.shape[0] // (shards * steps)
            x = x.reshape(shards, steps, micro, *x.shape[1:])  # (D, K, b, ...)
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

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

    @property
    def _guarded(self) -> bool:
        """Whether a non-finite step is skipped on device (see `on_nonfinite`)."""
        return self.on_nonfinite == "skip" or self.precision.dynamic_loss_scale

    def _train_step(
        self, arrays: list[jax.Array], batch_leaves: list[jax.Array]
    ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
        state = self.unflatten(arrays)
        assert self._batch_spec is not None
        batch = self._batch_spec.treedef.unflatten(batch_leaves)
        key = jax.random.fold_in(state.key, state.step)
        trainable, frozen = eqx.partition(state.model, self._mask)
        scale = state.loss_scale.scale if state.loss_scale is not None else None
        grads, loss, metrics = self._loss_and_grads(
            trainable, frozen, batch, key, scale
        )
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        grad_norm = _global_norm(grads, fused=self._params_replicated)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        if self._guarded:
            # A skipped step changes nothing but the counters (and fp16's scale). The
            # select costs a pass over the parameters and optimizer state (and XLA
            # copies the donated moments), so "raise" without loss scaling goes
            # without it: the Trainer stops at the next log step or checkpoint.
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda a, b: jnp.where(finite, a, b), new, old
            )
            new_trainable = keep(new_trainable, trainable)
            opt_state = keep(opt_state, state.opt_state)
        # Under loss scaling, overflowing gradients with a finite loss are the
        # scaler's ordinary work (it halves the scale); only a bad loss is "bad".
        bad = ~finite if scale is None else ~jnp.isfinite(loss)
        new_state = TrainState(
            model=eqx.combine(new_trainable, frozen),
            opt_state=opt_state,
            step=state.step + 1,
            rng=state.rng,
            data_position=state.data_position + 1,
            loss_scale=(
                self.precision.next_loss_scale(state.loss_scale, finite)
                if state.loss_scale is not None
                else None
            ),
            bad_steps=state.bad_steps + bad.astype(jnp.int32),
            first_bad_step=jnp.where(
                bad & (state.first_bad_step < 0), state.step, state.first_bad_step
            ),
        )
        out = {"loss": loss, "grad_norm": grad_norm, **metrics}
        lr = current_lr(opt_state)
        if lr is not None:
            out["lr"] = jnp.asarray(lr, jnp.float32)
        if scale is not None:
            out["loss_scale"] = scale
        return [jax.tree.leaves(new_state)[i] for i in self._array_index], out

    # --- evaluation -----------------------------------------------------------------

    def put_eval_batch(self, batch: Any) -> Any:
        """Place an evaluation batch: any leading size the data axes divide (its
        shape need not match the training batches'; each new shape compiles once)."""
        return put_batch(batch, self.plan, self.mesh, accumulate=False)

    def evaluate(self, state: TrainState, batch: Any) -> dict[str, jax.Array]:
        """Loss and metrics of one batch under `state`, without an update.

        The loss is called with `key=None` (no dropout).
        """
        arrays = self.flatten(state)
        placed = self.put_eval_batch(batch)
        if self._jitted_eval is None:
            self._jitted_eval = jax.jit(self._eval_step)
        jitted: Any = self._jitted_eval
        return jitted(arrays, placed)

    def _eval_step(self, arrays: list[jax.Array], batch: Any) -> dict[str, jax.Array]:
        state = self.unflatten(arrays)
        model = self.precision.cast(state.model)
        loss, metrics = _split_loss_output(
            self.loss(model, self.precision.cast(batch), _EVAL_KEY), "`loss`"
        )
        out = {"loss": loss, **metrics}
        return {n: jnp.asarray(v, jnp.float32) for n, v in out.items()}


def _global_norm(grads: Any, *, fused: bool) -> jax.Array:
    """The gradients' global L2 norm (a logged metric and the non-finite check).

    With replicated gradients, one reduction over their concatenation: XLA fuses the
    concatenation into it, so it is one kernel (and one XLA:CPU thunk) instead of a
    reduction per leaf, about 5 µs of a 60 µs dispatch-bound step (benchmarks/
    overhead.py). Sharded gradients keep the per-leaf sums, which reduce locally
    and combine in one small all-reduce; concatenating them would gather them."""
    if not fused:
        return optax.tree.norm(grads)
    flat = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grads)])  # (P,)
    return jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))


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
        The state always counts such steps (`bad_steps`, `first_bad_step`).
        `"raise"` (default): the step applies as computed (no extra device work) and
        `tx.Trainer` raises at the next log step or checkpoint, naming it; it never
        saves a checkpoint after it. `"skip"`: the step changes nothing but the
        counters (a select over parameters and optimizer state, about one extra
        pass over them per step) and training goes on. With fp16 loss scaling,
        non-finite steps are always skipped (the scaler lowers the scale).
    - `donate`: donate the old state's buffers to the new one (default True).
    - `mode`: `"jit"` (default): the loss sees the global batch and XLA partitions
        it. `"spmd"`: the loss runs per device on its shard of the batch (inside
        `tx.spmd`) and may call `tx.collectives`; gradients are local, accumulated
        locally and `pmean`-ed once over the data axes. DP plans only.
    - `stage`: with a `PP` plan, the `tx.Stage` saying where the stacked layers are
        and what runs before (`pre`) and after them (`post`, which gives the training
        loss). `loss` is then used by `evaluate` only.

    **Returns:** a `TrainStep`; `init, step = tx.make_train_step(...)` also works.

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
        precision=precision,
        on_nonfinite=on_nonfinite,
        donate=donate,
        mode=mode,
        stage=stage,
    )
