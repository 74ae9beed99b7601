"""`tx.spmd`: a per-device program over a mesh (`jax.shard_map`), specs from a plan.

Also `value_and_grad`/`grad`, which take gradients under the one rule Titanax keeps
inside `tx.spmd` (see `spmd`'s docstring and `docs/spmd.md`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._compat import shard_map
from .._errors import CollectiveError, PlanError, ShardingError
from .._plan import Plan
from .collectives import (
    _SPMD_CONTEXT,
    _check_axes,
    _manual_axes,
    _spmd_context,
    _SpmdContext,
    _varying_mark,
)

__all__ = ["grad", "spmd", "spmd_specs", "value_and_grad"]


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _is_model(tree: Any) -> bool:
    """True if `tree` is, or contains, an `eqx.Module` (a model, a train state)."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    return any(isinstance(x, eqx.Module) for x in nodes)


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    out: list[str] = []
    for entry in spec:
        for name in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(name, str) and name not in out:
                out.append(name)
    return tuple(out)


def _model_specs(model: Any, plan: Plan, mesh: Mesh) -> Any:
    """Specs with the structure of `eqx.filter(model, eqx.is_array)`."""
    # The plan specs every array-like leaf (None elsewhere), on the model's own
    # structure; re-key them on the array half so they match what shard_map gets.
    specs = plan.partition_specs(model, mesh)
    leaves, treedef = jax.tree.flatten(model)
    spec_leaves = treedef.flatten_up_to(specs)
    return jax.tree.unflatten(
        treedef,
        [
            s if eqx.is_array(leaf) else None
            for leaf, s in zip(leaves, spec_leaves, strict=True)
        ],
    )


def _batch_specs(batch: Any, plan: Plan, mesh: Mesh) -> Any:
    shards = plan.data_parallel_size(mesh)

    def leaf_spec(path: Any, leaf: Any) -> Any:
        if not eqx.is_array(leaf):
            return None
        if leaf.ndim and leaf.shape[0] % shards:
            where = jax.tree_util.keystr(path) or "(root)"
            raise ShardingError(
                f"`tx.spmd` splits the leading dim of each batch array over "
                f"{plan.data_axes} ({shards} shards), but the array at {where} has "
                f"shape {tuple(leaf.shape)}.",
                path=where,
                suggestion=f"Use a batch size that is a multiple of {shards}.",
            )
        return plan.batch_spec(leaf.ndim)

    return jax.tree_util.tree_map_with_path(leaf_spec, batch)


def spmd_specs(tree: Any, plan: Plan, mesh: Mesh) -> Any:
    """The `PartitionSpec`s `tx.spmd` derives for one argument.

    A model (any PyTree holding an `eqx.Module`) gets the plan's parameter specs; any
    other PyTree is a batch and gets `plan.batch_spec(ndim)` on every array (leading dim
    split over `plan.data_axes`). Useful as an explicit `out_specs` entry when a body
    returns an updated, sharded model.

    **Arguments:**

    - `tree`: the argument (a model, a batch, ...).
    - `plan`: the `tx.Plan`.
    - `mesh`: the mesh.

    **Returns:** a PyTree with the structure of `eqx.filter(tree, eqx.is_array)`:
    a `PartitionSpec` per array, `None` elsewhere.
    """
    if _is_model(tree):
        return _model_specs(tree, plan, mesh)
    return _batch_specs(tree, plan, mesh)


def _check_inputs(fn: Any, plan: Any, mesh: Any) -> None:
    if not callable(fn):
        raise CollectiveError(
            f"`tx.spmd` expects a function, got {type(fn).__name__}.",
            suggestion="Write `tx.spmd(step, plan, mesh)`.",
        )
    if plan is not None and not isinstance(plan, Plan):
        raise PlanError(
            f"`tx.spmd` expects a `tx.Plan` (or None), got {type(plan).__name__}.",
            suggestion="Build one, e.g. `tx.Plan(dp=tx.DP())`.",
        )
    if not isinstance(mesh, Mesh):
        raise CollectiveError(
            f"`tx.spmd` expects a `jax.sharding.Mesh`, got {type(mesh).__name__}.",
            suggestion="Build one with `tx.make_mesh(data=-1)`.",
        )
    if plan is not None:
        plan.check_mesh(mesh)


def _resolve_in_specs(
    args: Sequence[Any], in_specs: Any, plan: Plan | None, mesh: Mesh
) -> tuple[Any, ...]:
    if in_specs is None:
        in_specs = (None,) * len(args)
    elif _is_spec(in_specs):
        in_specs = (in_specs,) * len(args)
    elif not isinstance(in_specs, tuple | list) or len(in_specs) != len(args):
        got = len(in_specs) if isinstance(in_specs, tuple | list) else in_specs
        raise CollectiveError(
            f"`tx.spmd` got {len(args)} positional arguments but in_specs={got!r}; "
            "give one spec entry per argument.",
            suggestion="Pass a tuple with an entry per argument (None: from the plan).",
        )
    specs = []
    for i, (arg, spec) in enumerate(zip(args, in_specs, strict=True)):
        if spec is None:
            if plan is None:
                raise CollectiveError(
                    f"`tx.spmd` has no plan to derive the spec of argument {i} from.",
                    suggestion=(
                        "Pass a `tx.Plan`, or give this argument's spec in `in_specs`."
                    ),
                )
            spec = spmd_specs(arg, plan, mesh)
        specs.append(spec)
    return tuple(specs)


def _batch_axes(
    args: Sequence[Any],
    specs: Sequence[Any],
    plan: Plan | None,
    manual: tuple[str, ...],
) -> tuple[str, ...]:
    """The manual axes the batch varies over.

    With a plan: `plan.data_axes`. Without: every axis named in the specs of the
    arguments that are not models.
    """
    if plan is not None:
        axes: Sequence[str] = plan.data_axes
    else:
        found: list[str] = []
        for arg, spec in zip(args, specs, strict=True):
            if _is_model(arg):
                continue
            for s in jax.tree.leaves(spec, is_leaf=_is_spec):
                if _is_spec(s):
                    found.extend(a for a in _spec_axes(s) if a not in found)
        axes = found
    return tuple(a for a in manual if a in axes)


def spmd(
    fn: Callable[..., Any],
    plan: Plan | None,
    mesh: Mesh,
    in_specs: Any = None,
    out_specs: Any = None,
    *,
    check_vma: bool = True,
    axis_names: Sequence[str] | None = None,
) -> Callable[..., Any]:
    """Run `fn` once per device on its shards: `jax.shard_map` with plan-derived specs.

    `fn` sees per-device shards and may call `tx.collectives` by mesh axis name. Models
    (`eqx.Module`s, or PyTrees holding them) may be passed directly: their non-array
    leaves (activation functions, ...) are split off before `jax.shard_map` and put
    back inside, and the same is done for what `fn` returns.

    **The gradient rule.** Inside `tx.spmd`, take gradients with `tx.value_and_grad`
    (or `tx.grad`). It marks the parameters *varying* along the batch axes before
    differentiating, so each device gets its **local** gradient, which you then reduce
    yourself: `grads = tx.collectives.pmean(grads, "data")` gives the data-parallel
    gradient, exactly as with `pmap`. Plain `jax.grad` of a replicated parameter under
    `check_vma=True` instead returns gradients *already summed* over the axis (the
    transpose of JAX's implicit broadcast is a `psum`), and a `pmean` after it would
    give N× gradients; Titanax refuses that: `tx.collectives.pmean`/`psum` raise
    `CollectiveError` on a floating-point value that is already invariant along the
    axis. The parameters `fn` receives stay invariant (replicated), so an update
    `params - lr * pmean(grads)` is replicated too and can be returned under `P()`.

    **Arguments:**

    - `fn`: the per-device function; positional arguments only.
    - `plan`: a `tx.Plan` to derive specs from, or `None` with explicit `in_specs`.
    - `mesh`: the `jax.sharding.Mesh`.
    - `in_specs`: `None` to derive every argument's specs from the plan, or a tuple
        with one entry per positional argument: a `PartitionSpec` (for every array of
        that argument), a PyTree of them matching the argument's arrays, or `None` to
        derive that argument's specs. Derived specs: a model gets the plan's parameter
        specs (`tx.spmd_specs`); anything else is a batch whose arrays are split along
        their leading dim over `plan.data_axes`.
    - `out_specs`: `None` for `P()` on every output array, that is, outputs are
        replicated (check_vma verifies that they are; reduce per-device values with a
        collective first). Or a spec PyTree (prefix) for the array half of the output.
    - `check_vma`: passed to `jax.shard_map`. Keep it on: it is what lets JAX (and
        Titanax) see which values differ between devices.
    - `axis_names`: mesh axes `fn` is manual over (default: all). Others stay
        automatic (compiler-partitioned) inside `fn`.

    **Returns:** a compiled function of the same positional arguments returning `fn`'s
    output as global arrays. It partitions its arguments, then calls a `jax.jit` of
    the `shard_map` with input shardings pinned to the specs, cached per argument
    structure, static leaves and shapes (so models with non-array leaves can be passed
    as they are). It also works inside an outer `jax.jit`. `.lower(*args)` lowers it,
    as on a `jax.jit` function, e.g. to read the compiled HLO.

    !!! Example
        ```python
        mesh = tx.make_mesh(data=8)
        plan = tx.Plan(dp=tx.DP("data"))

        def step(model, batch):  # per device: 1/8 of the batch
            loss, grads = tx.value_and_grad(loss_fn)(model, batch)
            grads = tx.collectives.pmean(grads, "data")  # one all-reduce
            model = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))
            return model, tx.collectives.pmean(loss, "data")

        step = tx.spmd(step, plan, mesh)
        model, loss = step(model, batch)
        ```
    """
    _check_inputs(fn, plan, mesh)
    mesh_axes = tuple(str(a) for a in mesh.axis_names)
    if axis_names is None:
        manual = mesh_axes
    else:
        manual = tuple(a for a in mesh_axes if a in set(axis_names))
        unknown = sorted(set(axis_names) - set(mesh_axes))
        if unknown:
            raise CollectiveError(
                f"`tx.spmd` got axis_names {tuple(axis_names)}, but the mesh has axes "
                f"{mesh_axes}.",
                suggestion=f"Drop {unknown} or add them to the mesh.",
            )

    cache: dict[Any, tuple[Any, list[Any]]] = {}

    def build(args: tuple[Any, ...]) -> tuple[Any, list[Any]]:
        specs = _resolve_in_specs(args, in_specs, plan, mesh)
        static = tuple(eqx.filter(arg, eqx.is_array, inverse=True) for arg in args)
        context = _SpmdContext(
            batch_axes=_batch_axes(args, specs, plan, manual),
            manual_axes=manual,
            check_vma=check_vma,
        )
        out_static: list[Any] = []

        def body(*dyn: Any) -> Any:
            full = [eqx.combine(d, s) for d, s in zip(dyn, static, strict=True)]
            token = _SPMD_CONTEXT.set(context)
            try:
                out = fn(*full)
            finally:
                _SPMD_CONTEXT.reset(token)
            out_dynamic, out_rest = eqx.partition(out, eqx.is_array)
            out_static.append(out_rest)
            return out_dynamic

        mapped = shard_map(
            body,
            mesh=mesh,
            in_specs=specs,
            out_specs=PartitionSpec() if out_specs is None else out_specs,
            axis_names=None if axis_names is None else frozenset(manual),
            check_vma=check_vma,
        )
        # Pinning the input shardings to the specs keeps one compilation whatever the
        # arguments' current placement (e.g. step 1's freshly made batch vs. step 0's
        # outputs fed back in).
        shardings = jax.tree.map(
            lambda spec: NamedSharding(mesh, spec) if _is_spec(spec) else spec,
            specs,
            is_leaf=lambda x: _is_spec(x) or x is None,
        )
        return jax.jit(mapped, in_shardings=shardings), out_static

    def prepare(args: tuple[Any, ...]) -> tuple[Any, list[Any]]:
        key = _cache_key(args)
        entry = cache.get(key) if key is not None else None
        if entry is None:
            entry = build(args)
            if key is not None:
                cache[key] = entry
        return entry

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        compiled, out_static = prepare(args)
        out_dynamic = compiled(*(eqx.filter(arg, eqx.is_array) for arg in args))
        return eqx.combine(out_dynamic, out_static[-1])

    def lower(*args: Any) -> Any:
        compiled, _ = prepare(args)
        return compiled.lower(*(eqx.filter(arg, eqx.is_array) for arg in args))

    # `step.lower(*args)`, as on a `jax.jit` function: for reading the compiled HLO.
    setattr(wrapped, "lower", lower)  # noqa: B010
    return wrapped


def _cache_key(args: tuple[Any, ...]) -> Any:
    """What a compiled `tx.spmd` call depends on: structure, static leaves, avals.

    `None` when a static leaf is unhashable (then nothing is cached).
    """
    leaves, treedef = jax.tree.flatten(args)
    key = tuple(
        ("array", tuple(leaf.shape), str(leaf.dtype))
        if eqx.is_array(leaf)
        else ("static", leaf)
        for leaf in leaves
    )
    try:
        hash(key)
    except TypeError:
        return None
    return treedef, key


def _grad_axes(axes: Any, who: str) -> tuple[str, ...]:
    if axes is not None:
        return _check_axes(axes, who)
    context = _spmd_context()
    if context is not None:
        return context.batch_axes
    return _manual_axes()[1]


def value_and_grad(
    fn: Callable[..., Any], *, has_aux: bool = False, axes: Any = None
) -> Callable[..., Any]:
    """`jax.value_and_grad` that gives per-device (local) gradients inside SPMD code.

    Differentiates with respect to the floating-point arrays of the first argument (a
    model or any PyTree), as `eqx.filter_value_and_grad` does, after marking them
    varying along `axes` (`tx.collectives.pvary`). So replicated parameters get their
    local gradient on each device, never one already summed over the axis, and
    "local grads, then `tx.collectives.pmean(grads, axis)`" is the data-parallel
    gradient. Outside any mesh it is a plain filtered `value_and_grad`.

    **Arguments:**

    - `fn`: `fn(x, *args, **kwargs) -> loss` (or `(loss, aux)` with `has_aux`).
    - `has_aux`: as in `jax.value_and_grad`.
    - `axes`: the mesh axes to mark along. Default: inside `tx.spmd`, the batch axes
        (`plan.data_axes`); inside a plain `jax.shard_map`, every manual axis.

    **Returns:** a function of the same arguments returning `(value, grads)` (or
    `((value, aux), grads)`); `grads` has the structure of `x`, with `None` at
    non-differentiated leaves.

    !!! Example
        ```python
        def step(model, batch):                  # inside tx.spmd, batch on "data"
            loss, g = tx.value_and_grad(loss_fn)(model, batch)  # local gradient
            g = tx.collectives.pmean(g, "data")  # mean over the 8 devices
            ...
        ```
    """

    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        names = _grad_axes(axes, "value_and_grad")
        diff, rest = eqx.partition(x, eqx.is_inexact_array)
        diff = _varying_mark(diff, names)

        def inner(d: Any) -> Any:
            return fn(eqx.combine(d, rest), *args, **kwargs)

        return jax.value_and_grad(inner, has_aux=has_aux)(diff)

    return wrapper


def grad(
    fn: Callable[..., Any], *, has_aux: bool = False, axes: Any = None
) -> Callable[..., Any]:
    """`jax.grad` with Titanax's SPMD rule: local gradients; see `value_and_grad`.

    **Arguments:** as `value_and_grad`.

    **Returns:** a function returning `grads` (or `(grads, aux)` with `has_aux`).

    !!! Example
        ```python
        g = tx.collectives.pmean(tx.grad(loss_fn)(model, batch), "data")
        ```
    """
    vg = value_and_grad(fn, has_aux=has_aux, axes=axes)

    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        value, grads = vg(x, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper
