"""From plan to placed arrays: shardings, shard, init."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh

from ._axes import is_arraylike
from ._errors import ShardingError
from ._plan import Plan

__all__ = ["init", "partition_specs", "shard", "shardings"]


def _check_plan(plan: Any) -> Plan:
    if not isinstance(plan, Plan):
        raise ShardingError(
            f"Expected a `tx.Plan`, got {type(plan).__name__}.",
            suggestion="Build one, e.g. `tx.Plan(dp=tx.DP())`.",
        )
    return plan


def _check_mesh(mesh: Any) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise ShardingError(
            f"Expected a `jax.sharding.Mesh`, got {type(mesh).__name__}.",
            suggestion="Build one with `tx.make_mesh(data=-1)`.",
        )
    return mesh


def partition_specs(model: Any, plan: Plan, mesh: Mesh) -> Any:
    """Mesh `PartitionSpec`s for every array of `model` under `plan` on `mesh`.

    **Returns:** a PyTree with the structure of `eqx.filter(model, eqx.is_array)`.
    """
    return _check_plan(plan).partition_specs(model, _check_mesh(mesh))


def shardings(model: Any, plan: Plan, mesh: Mesh) -> Any:
    """`NamedSharding`s for every array of `model` under `plan` on `mesh`.

    **Arguments:**

    - `model`: an `eqx.Module`, or its `eqx.filter_eval_shape` output.
    - `plan`: the `tx.Plan`.
    - `mesh`: the device mesh.

    **Returns:** a PyTree with the structure of `eqx.filter(model, eqx.is_array)`,
    holding a `jax.sharding.NamedSharding` per array and `None` elsewhere.

    **Raises:** `PlanError`/`ShardingError` (see `Plan.validate`).
    """
    return _check_plan(plan).shardings(model, _check_mesh(mesh))


def shard(model: Any, plan: Plan, mesh: Mesh) -> Any:
    """Place an existing model's arrays on `mesh` as `plan` says.

    **Returns:** the same model with every array a sharded `jax.Array`.

    The placed arrays are copies: donating them later (as the training step does)
    never deletes the caller's arrays. For large models prefer `tx.init`, which
    never materialises the whole model.
    """
    tree = shardings(model, plan, mesh)
    params, static = eqx.partition(model, eqx.is_array)
    # A compiled identity writes fresh buffers; `jax.device_put` may alias the
    # caller's (even with `may_alias=False` on CPU), and donation would delete them.
    placed = jax.jit(lambda p: p, out_shardings=tree)(params)
    return eqx.combine(placed, static)


def init(
    make_model: Callable[[jax.Array], Any], key: jax.Array, plan: Plan, mesh: Mesh
) -> Any:
    """Create a model directly sharded: no device ever holds the whole model.

    The model's shapes are traced with `eqx.filter_eval_shape`, shardings derived from
    them, and `make_model` is compiled with those `out_shardings`, so each device
    computes only its own shards. With `jax_threefry_partitionable` (JAX's default) the
    values equal an unsharded `make_model(key)`.

    **Arguments:**

    - `make_model`: `key -> eqx.Module`.
    - `key`: a PRNG key.
    - `plan`, `mesh`: where to put it.

    **Returns:** the model, its arrays sharded.
    """
    program, static = _init_program(make_model, key, plan, mesh)
    return eqx.combine(program(key), static)


def _init_program(
    make_model: Callable[[jax.Array], Any], key: jax.Array, plan: Plan, mesh: Mesh
) -> tuple[Any, Any]:
    """The jitted `key -> arrays` program `init` runs, and the model's static part.

    Kept separate so that tests and `explain` can lower and inspect the program.
    """
    abstract = eqx.filter_eval_shape(make_model, key)
    tree = shardings(abstract, plan, mesh)
    static = eqx.filter(abstract, lambda x: not is_arraylike(x))

    def make_params(k: jax.Array) -> Any:
        return eqx.filter(make_model(k), eqx.is_array)

    return jax.jit(make_params, out_shardings=tree), static
