"""From plan to placed arrays: shardings, shard, init."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ._axes import describe_value, is_arraylike
from ._checks import expect_mesh, expect_plan
from ._errors import ModelError
from ._plan import Plan

__all__ = [
    "check_key",
    "check_model_factory",
    "init",
    "partition_specs",
    "shard",
    "shardings",
]


def _mesh(mesh: Any, where: str) -> Mesh:
    checked = expect_mesh(mesh, f"{where}(mesh=...)")
    assert checked is not None
    return checked


def partition_specs(model: Any, plan: Plan, mesh: Mesh) -> Any:
    """Mesh `PartitionSpec`s for every array of `model` under `plan` on `mesh`.

    **Returns:** a PyTree with the structure of `eqx.filter(model, eqx.is_array)`.
    """
    expect_plan(plan, "partition_specs(plan=...)")
    return plan.partition_specs(model, _mesh(mesh, "partition_specs"))


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
    expect_plan(plan, "shardings(plan=...)")
    return plan.shardings(model, _mesh(mesh, "shardings"))


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

    - `make_model`: a function `key -> eqx.Module`, such as
        `lambda key: MyModel(..., key=key)`, or a model class whose only required
        argument is the key.
    - `key`: a PRNG key (`jax.random.key(0)`).
    - `plan`, `mesh`: where to put it.

    **Returns:** the model, its arrays sharded.

    **Raises:** `ModelError`, before anything is traced or compiled, if `make_model`
    is not callable as `make_model(key)` (a built model, a class that needs more
    arguments, a function of no arguments; read from its signature) or `key` is not
    a PRNG key; after tracing, before compiling, if it returns no `eqx.Module`. The
    plan's own errors (`PlanError`, ...) as `Plan.validate` lists them.

    !!! Example
        ```python
        model = tx.init(lambda key: MLP(128, 512, key=key), jax.random.key(0),
                        plan, mesh)
        ```
    """
    program = _init_program(make_model, key, plan, mesh)
    return program.build(program.jitted(key))


_FORM = "lambda key: MyModel(..., key=key)"


def check_model_factory(make_model: Any) -> None:
    """Raise `ModelError` unless `make_model` can be called as `make_model(key)`.

    Reads the signature (`inspect.signature`); callables without one (some builtins)
    pass. Shared by `tx.init` and whatever accepts a `key -> Module` function.
    """
    name = getattr(make_model, "__qualname__", type(make_model).__name__)
    form = _FORM.replace("MyModel", name) if isinstance(make_model, type) else _FORM
    if isinstance(make_model, eqx.Module) and not isinstance(make_model, eqx.Partial):
        raise ModelError(
            "Expected `make_model` to be a function `key -> eqx.Module`, got an "
            f"already-built `{type(make_model).__name__}`.",
            path="make_model",
            suggestion=(
                "Place a built model with `tx.shard(model, plan, mesh)`; to create it "
                f"sharded, pass the function that builds it: `{form}`."
            ),
        )
    if not callable(make_model):
        raise ModelError(
            "Expected `make_model` to be a function `key -> eqx.Module`, got "
            f"{describe_value(make_model)}.",
            path="make_model",
            suggestion=f"Pass e.g. `{form}`.",
        )
    try:
        signature = inspect.signature(make_model)
    except (TypeError, ValueError):
        return  # no signature to read (a builtin): calling it will tell
    try:
        signature.bind(object())
    except TypeError:
        pass
    else:
        return
    what = describe_value(make_model)
    # Names and defaults only: annotations make signatures unreadable in one line.
    bare = signature.replace(
        parameters=[
            p.replace(annotation=inspect.Parameter.empty)
            for p in signature.parameters.values()
        ],
        return_annotation=inspect.Signature.empty,
    )
    if not signature.parameters:
        got = f"{what}, which takes no arguments"
    elif isinstance(make_model, type):
        got = f"{what}, whose constructor is `{name}{bare}`"
    else:
        got = f"{what}, whose signature is `{bare}`"
    raise ModelError(
        "Expected `make_model` to be callable as `make_model(key)` (one positional "
        f"PRNG key, returning an `eqx.Module`), got {got}.",
        path="make_model",
        suggestion=f"Wrap it in a function of the key: `{form}`.",
    )


def check_key(key: Any) -> None:
    """Raise `ModelError` unless `key` is a PRNG key (typed, or raw `uint32[2]`)."""
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()) or ())
    if dtype is not None and (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        or (np.dtype(dtype) == np.uint32 and shape == (2,))
    ):
        return
    raise ModelError(
        "Expected a PRNG key for `make_model(key)`, got "
        f"{describe_value(key)}"
        + (f" of dtype {dtype} and shape {shape}" if dtype is not None else "")
        + ".",
        path="key",
        suggestion="Pass `jax.random.key(seed)`.",
    )


class _InitProgram(NamedTuple):
    """`init`'s compiled program and how to turn its output into the model."""

    jitted: Any  # key -> the model's arrays, a flat list in leaf order, sharded
    treedef: Any  # of the model's array part
    static: Any  # the model's non-array part

    def build(self, leaves: list[Any]) -> Any:
        """The model from the program's output."""
        return eqx.combine(jax.tree.unflatten(self.treedef, leaves), self.static)


def _init_program(
    make_model: Callable[[jax.Array], Any], key: jax.Array, plan: Plan, mesh: Mesh
) -> _InitProgram:
    """The jitted program `init` runs, with what rebuilds the model from its output.

    Kept separate so that tests can lower and inspect the program.
    """
    check_model_factory(make_model)
    check_key(key)
    abstract = eqx.filter_eval_shape(make_model, key)
    if not isinstance(abstract, eqx.Module):
        tuple_hint = (
            " (a tuple, as `eqx.nn.make_with_state` returns: build the model, then "
            "its state with `eqx.nn.State(model)`)"
            if isinstance(abstract, tuple)
            else ""
        )
        raise ModelError(
            "Expected `make_model(key)` to return an `eqx.Module`, got "
            f"{describe_value(abstract)}{tuple_hint}.",
            path="make_model",
            suggestion=f"Return the model itself: `{_FORM}`.",
        )
    tree = shardings(abstract, plan, mesh)
    params, static = eqx.partition(abstract, is_arraylike)
    # Out-shardings as a flat list, in leaf order: a model's static metadata may
    # differ between two traces (`eqx.nn.StateIndex` makes a fresh marker each time),
    # so the tree of the traced model could not serve as a prefix of the program's.
    flat = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    treedef = jax.tree.structure(params)

    def make_params(k: jax.Array) -> list[Any]:
        return jax.tree.leaves(eqx.filter(make_model(k), eqx.is_array))

    return _InitProgram(jax.jit(make_params, out_shardings=flat), treedef, static)
