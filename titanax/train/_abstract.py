"""Abstract TrainStates: shapes, dtypes and shardings, no memory.

A restore target says where every array lands. `abstract_state` traces
`TrainStep.init` (the code path that builds a real state) with `eqx.filter_eval_shape`
and attaches the shardings the plan gives on the new mesh, so a checkpoint restores
straight into the new layout without ever materialising the model first.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._axes import is_arraylike
from .._plan import Plan
from .._sharding import shardings
from ..parallel.pipeline import Stage
from ._precision import Precision
from ._state import TrainState
from ._step import Trainable, TrainStep, opt_state_shardings, trainable_mask

__all__ = ["abstract_state"]


def _no_loss(model: Any, batch: Any, key: Any) -> Any:  # pragma: no cover
    raise AssertionError("abstract_state never runs a loss")


def abstract_state(
    model: Any,
    plan: Plan,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    *,
    trainable: Trainable | None = None,
    precision: Precision | None = None,
    stage: Stage | None = None,
    key: jax.Array | int = 0,
) -> TrainState:
    """The `TrainState` that `tx.make_train_step(...).init(model, key)` would build,
    as `jax.ShapeDtypeStruct`s carrying their shardings: a restore target.

    Nothing is allocated: the model is traced, not built. Restoring onto this target
    lands every array directly in the sharding `plan` gives it on `mesh`, whatever the
    plan and mesh the checkpoint was saved with (resharding).

    **Arguments:**

    - `model`: the model (`eqx.Module`), or a `key -> eqx.Module` function (cheaper:
        no weights are ever computed).
    - `plan`, `mesh`: the layout to restore into.
    - `optimizer`: the Optax transformation the state's `opt_state` belongs to.
    - `trainable`, `precision`: as for `tx.make_train_step`; they decide which
        arrays have optimizer state and whether a loss scale exists.
    - `stage`: with a `PP` plan, the `tx.Stage` (as for `tx.make_train_step`).
    - `key`: as for `init` (only its type matters here).

    **Returns:** a `TrainState` whose array leaves are
    `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))`; its
    non-array leaves (activation functions, ...) are the model's.

    !!! Example
        ```python
        target = tx.abstract_state(make_model, new_plan, new_mesh, optimizer)
        state = ckpt.restore(target)  # resharded onto new_mesh
        ```
    """
    builder = TrainStep(
        _no_loss,
        optimizer,
        plan,
        mesh,
        trainable=trainable,
        precision=precision,  # type: ignore[arg-type]
        stage=stage,
    )
    traced = eqx.filter_eval_shape(lambda m: builder.init(m, key), model)
    spec = jax.tree.unflatten(
        jax.tree.structure(traced.model),
        list(trainable_mask(traced.model, trainable)),
    )
    rep = NamedSharding(mesh, PartitionSpec())
    model_shardings = shardings(traced.model, plan, mesh)
    opt_shardings = opt_state_shardings(
        optimizer, traced.opt_state, eqx.filter(model_shardings, spec), mesh
    )

    def place(tree: Any, tree_shardings: Any) -> Any:
        def one(x: Any, sharding: Any) -> Any:
            if not isinstance(x, jax.ShapeDtypeStruct):
                return x
            if not isinstance(sharding, NamedSharding):
                sharding = rep
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        dynamic, static = eqx.partition(tree, is_arraylike)
        placed = jax.tree.map(one, dynamic, tree_shardings, is_leaf=lambda x: x is None)
        return eqx.combine(placed, static)

    # The model and its optimizer state land where the plan puts them; the
    # counters, key and loss scale are replicated.
    replicated = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
            if isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        traced,
    )
    return eqx.tree_at(
        lambda s: (s.model, s.opt_state),
        replicated,
        replace=(
            place(traced.model, model_shardings),
            place(traced.opt_state, opt_shardings),
        ),
    )
