"""The one place that knows how JAX and Orbax differ between supported versions.

Titanax runs on jax 0.7.2 through 0.10.2 (see the README's supported-versions table).
Every other module imports the version-sensitive pieces from here; `tests/
test_compat.py` fails if one of them is used anywhere else in `titanax/`.

Each shim picks its implementation by *feature detection* (does the attribute exist?),
never by comparing version strings, and says in a comment which versions need which
branch. Where the supported range has a single spelling (e.g. `jax.shard_map`), the
shim is a plain pass-through kept here so that the next renaming is a one-line change.
A feature that only a JAX below the line lacks is not emulated: importing Titanax on
such a JAX raises a `TitanaxError` that names the version it needs.

Why the line falls at jax 0.7.2: `tx.spmd`'s gradient rule and the N× gradient guard
are built on `jax.shard_map(..., check_vma=True)` and its varying-manual-axes types,
which jax 0.5.x and 0.6.0 lack. jax 0.6.1-0.6.2 have them but partition with GSPMD by
default (Shardy from 0.7), which loses the Megatron collective layout of tensor
parallel plans and does not combine the data-parallel gradient all-reduces, and their
`jax.distributed.initialize` has no heartbeat timeout (a dead peer is not detected).
Equinox excludes jax 0.7.0 and 0.7.1.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import jax
import numpy as np

from ._errors import TitanaxError

__all__ = [
    "MIN_JAX",
    "CompiledMemory",
    "auto_mesh",
    "backends_initialized",
    "compiled_cost",
    "compiled_memory",
    "compiled_memory_or_why",
    "distributed_initialize",
    "is_jaxpr",
    "mark_varying",
    "memory_stats",
    "orbax_type_handler_registry",
    "preemption_service_enabled",
    "reached_preemption_sync_point",
    "set_mesh",
    "shard_map",
    "shard_map_manual_axes",
    "trace_mesh_axes",
    "varying_axes",
]

MIN_JAX = "0.7.2"

# Checked before anything else touches JAX's newer names (hence `jax.sharding.Mesh`
# below rather than an import of it). What the oldest supported JAX has and older
# ones lack (jax 0.6.1 added
# `jax.shard_map` and `jax.typeof`, 0.7 `jax.set_mesh` and the heartbeat timeout).
_REQUIRED = ("shard_map", "typeof", "set_mesh")


def _check_jax(module: Any) -> None:
    """Raise a `TitanaxError` naming `MIN_JAX` if `module` (jax) is older."""
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        names = ", ".join(f"`jax.{n}`" for n in missing)
        raise TitanaxError(
            f"Expected jax >= {MIN_JAX}, got jax "
            f"{getattr(module, '__version__', '?')}, which lacks {names}.",
            suggestion=f"Install a supported JAX: `pip install 'jax>={MIN_JAX}'`.",
        )


_check_jax(jax)


# --- shard_map ----------------------------------------------------------------------


def shard_map(
    f: Callable[..., Any],
    *,
    mesh: Any,
    in_specs: Any,
    out_specs: Any,
    axis_names: frozenset[str] | None = None,
    check_vma: bool = True,
) -> Callable[..., Any]:
    """`jax.shard_map`: `f` run once per device of `mesh` on its shards.

    The same `jax.shard_map(..., check_vma=...)` in jax 0.7.2-0.10.2; before 0.6.1 it
    was `jax.experimental.shard_map.shard_map(..., check_rep=...)`, a different
    object with other typing rules (below Titanax's line). `axis_names=None` means
    every mesh axis is manual (jax's own default, `frozenset()`, means the same).

    **Arguments:** as `jax.shard_map`: `mesh`, `in_specs`, `out_specs`, the manual
    `axis_names` (the others stay automatic), and `check_vma` (track which values
    vary along which manual axes).

    **Returns:** the mapped function.
    """
    kwargs: dict[str, Any] = {}
    if axis_names is not None:
        kwargs["axis_names"] = frozenset(axis_names)
    return jax.shard_map(
        f,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=check_vma,
        **kwargs,
    )


# --- varying / invariant types inside shard_map --------------------------------------

# jax >= 0.9 casts with `jax.lax.pcast(x, axes, to="varying")`; jax 0.9 still has
# `jax.lax.pvary` but warns (DeprecationWarning), jax 0.10 removed it. jax 0.7.2-0.8.x
# only have `jax.lax.pvary`.
_pcast = getattr(jax.lax, "pcast", None)


def mark_varying(x: Any, axes: tuple[str, ...]) -> Any:
    """Type the array `x` as varying along the manual mesh `axes` (no data moves).

    The raw primitive: `x` must not already vary along any of `axes` (Titanax's
    `tx.collectives.pvary` filters those out first).

    **Arguments:**

    - `x`: an array inside `shard_map` with `check_vma=True`.
    - `axes`: the manual mesh axis names.

    **Returns:** `x`, typed varying along `axes`.
    """
    if _pcast is not None:
        return _pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # pyright: ignore[reportAttributeAccessIssue]


def varying_axes(x: Any) -> frozenset[str] | None:
    """The manual mesh axes along which `x`'s type says it varies (or is reduced).

    jax 0.7.2-0.9.x keep them on the abstract value as `jax.typeof(x).vma` (a
    frozenset); jax 0.10 replaced that with `jax.typeof(x).mat`, a `ManualAxisType`
    of `varying`, `unreduced` and `reduced` axis sets (all three count: a value
    that is (un)reduced along an axis is not invariant along it).

    **Arguments:**

    - `x`: an array, tracer or Python number.

    **Returns:** a frozenset of axis names (empty outside `shard_map`), or `None` if
    `x` carries no such type (JAX cannot type it).
    """
    try:
        aval = jax.typeof(x)
    except TypeError:
        return None
    vma = getattr(aval, "vma", None)  # jax 0.7.2-0.9.x
    if vma is not None:
        return frozenset(vma)
    mat = getattr(aval, "mat", None)  # jax >= 0.10
    if mat is None:
        return None
    return frozenset(mat.varying) | frozenset(mat.unreduced) | frozenset(mat.reduced)


def trace_mesh_axes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every axis name, the manual ones) of the mesh the current trace runs under.

    `jax.sharding.get_abstract_mesh()` (the same in jax 0.7.2-0.10.2): inside
    `shard_map` it is the mesh with the mapped axes manual, also under a nested
    `jax.jit`; outside any mesh context it is empty.

    **Returns:** two tuples of axis names; both empty when no mesh is active.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), ()
    names = tuple(str(n) for n in mesh.axis_names)
    manual = tuple(str(n) for n in mesh.manual_axes)
    return names, manual


def shard_map_manual_axes(params: Mapping[str, Any]) -> frozenset[str]:
    """The mesh axes a traced `shard_map` equation's body is manual over.

    The parameter is `manual_axes` in jax 0.7.2-0.9.x and `newly_manual_axes` from
    jax 0.10 (the axes this `shard_map` makes manual, not those of an enclosing one).

    **Arguments:**

    - `params`: `eqn.params` of a `shard_map` equation of a jaxpr.

    **Returns:** the manual axis names; every mesh axis if the equation names none.
    """
    for key in ("newly_manual_axes", "manual_axes"):  # jax >= 0.10, jax < 0.10
        manual = params.get(key)
        if manual:
            return frozenset(str(a) for a in manual)
    return frozenset(str(a) for a in params["mesh"].axis_names)


def is_jaxpr(x: Any) -> bool:
    """Whether `x` is an open `Jaxpr` (the body of a scan, cond, shard_map, ...).

    `jax.extend.core.Jaxpr` in every supported version; `jax.extend` sits outside
    JAX's compatibility policy, hence here.

    **Arguments:**

    - `x`: any object, e.g. an equation parameter.

    **Returns:** `True` for a `Jaxpr` (not a `ClosedJaxpr`).
    """
    from jax.extend import core

    return isinstance(x, core.Jaxpr)


# --- meshes -------------------------------------------------------------------------


def auto_mesh(devices: np.ndarray, axis_names: Sequence[str]) -> jax.sharding.Mesh:
    """A `Mesh` over `devices` whose axes are all `AxisType.Auto`.

    Said explicitly because the defaults moved: `jax.make_mesh` gives Explicit axes
    from jax 0.9 on (Auto before), while `jax.sharding.Mesh(...)` stays Auto.
    `axis_types=` exists from jax 0.5 on.

    **Arguments:**

    - `devices`: an array of devices shaped like the mesh.
    - `axis_names`: one name per dim of `devices`.

    **Returns:** the `jax.sharding.Mesh`.
    """
    names = tuple(axis_names)
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(devices, names, axis_types=(auto,) * len(names))


def set_mesh(mesh: jax.sharding.Mesh) -> AbstractContextManager[Any]:
    """A context manager that makes `mesh` the current mesh (`with set_mesh(m):`).

    `jax.set_mesh` in jax 0.7.2-0.10.2 (`with mesh:` is deprecated from 0.10.1; jax
    0.6 spelled it `jax.sharding.use_mesh`). Only the context-manager use is the same
    across versions.

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh`.

    **Returns:** the context manager (use it only in a `with` statement).
    """
    return jax.set_mesh(mesh)


def backends_initialized() -> bool:
    """Whether JAX has already created its backends (devices can no longer change).

    A private function (`jax._src.xla_bridge.backends_are_initialized`), present with
    that name in every supported version (0.7.2-0.10.2); kept here so the day it
    moves is a change in one place.

    **Returns:** `True` once any JAX computation or device query has run.
    """
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


# --- several processes --------------------------------------------------------------


def distributed_initialize(*, heartbeat_timeout_s: int, **kwargs: Any) -> None:
    """`jax.distributed.initialize(...)` with a heartbeat timeout.

    `heartbeat_timeout_seconds=` exists from jax 0.7 on (0.6 had none: a dead peer
    was never detected). Further arguments pass through unchanged; those that only
    some versions know (`shutdown_timeout_seconds` from jax 0.10) raise a
    `TitanaxError` naming the argument instead of JAX's `TypeError`.

    **Arguments:**

    - `heartbeat_timeout_s`: seconds of silence after which a process counts as dead.
    - `**kwargs`: the other arguments of `jax.distributed.initialize`.
    """
    known = inspect.signature(jax.distributed.initialize).parameters
    asked = (*kwargs, "heartbeat_timeout_seconds")
    unknown = sorted(k for k in asked if k not in known)
    if unknown:
        raise TitanaxError(
            f"Expected arguments that `jax.distributed.initialize` takes, got "
            f"{', '.join(f'`{k}`' for k in unknown)}, which jax {jax.__version__} "
            "does not know.",
            suggestion="Leave it out, or install a JAX that has it.",
        )
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s, **kwargs)


def preemption_service_enabled() -> bool:
    """Whether `jax.distributed.initialize` starts JAX's preemption service.

    The `jax_enable_preemption_service` option exists from jax 0.9 (on by default);
    jax 0.7.2-0.8.x always start the service.

    **Returns:** the option's value, `True` where it does not exist.
    """
    return bool(getattr(jax.config, "jax_enable_preemption_service", True))


def reached_preemption_sync_point(step: int) -> bool:
    """Whether every process should stop at `step` (one of them got SIGTERM).

    `jax.experimental.multihost_utils.reached_preemption_sync_point` in every
    supported version (an experimental module, hence here). Call it once per step,
    with the same steps on every process.

    **Arguments:**

    - `step`: the step just finished.

    **Returns:** `True` at the same step on every process.
    """
    from jax.experimental import multihost_utils

    return bool(multihost_utils.reached_preemption_sync_point(step))


# --- compiled executables ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """What XLA's buffer assignment says a compiled program needs, per device.

    - `argument`, `output`, `alias`, `temp`, `generated_code`: bytes.
    - `peak`: XLA's estimate of the peak bytes (`peak_memory_in_bytes`, which jax
        0.6 lacks).
    """

    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int
    peak: int


def compiled_memory(compiled: Any) -> CompiledMemory:
    """The memory statistics of a compiled program (`jax.jit(f).lower(...).compile()`).

    **Arguments:**

    - `compiled`: a `jax.stages.Compiled`.

    **Returns:** a `CompiledMemory`.
    """
    stats = compiled.memory_analysis()
    return CompiledMemory(
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
        peak=int(stats.peak_memory_in_bytes),
    )


def compiled_memory_or_why(compiled: Any) -> tuple[CompiledMemory | None, str | None]:
    """`compiled_memory`, or `None` and why there is none: some backends (PjRt
    plugins) return `None` from `memory_analysis()`, others raise.

    **Arguments:**

    - `compiled`: a `jax.stages.Compiled`.

    **Returns:** `(memory, None)`, or `(None, reason)` with the reason in words.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception as error:  # each backend raises its own type: name it, go on
        first_line = str(error).strip().splitlines()[:1]
        said = f": {first_line[0][:120]}" if first_line else ""
        return None, f"`memory_analysis()` raised {type(error).__name__}{said}"
    if stats is None:
        return None, "`memory_analysis()` returned None"
    return compiled_memory(compiled), None


def compiled_cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program: `flops`, `bytes accessed`, ...

    A dict in every supported version (jax < 0.4.36 returned a list of one dict per
    program, still accepted). Backends without a cost analysis raise or return
    nothing; both give `{}`.

    **Arguments:**

    - `compiled`: a `jax.stages.Compiled`.

    **Returns:** a dict of float counters (empty if the backend gives none).
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # e.g. a PjRt plugin without cost analysis
        return {}
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not isinstance(cost, Mapping):
        return {}
    return {str(k): float(v) for k, v in cost.items()}


def memory_stats(device: Any) -> dict[str, int] | None:
    """The allocator statistics of `device` (`bytes_in_use`, `peak_bytes_in_use`...).

    `Device.memory_stats()`: GPU and TPU backends report them, the CPU backend gives
    `None` (jax 0.7.2-0.10.2), and some PjRt plugins lack the method.

    **Arguments:**

    - `device`: a `jax.Device`.

    **Returns:** the statistics, or `None` where the backend reports none.
    """
    read = getattr(device, "memory_stats", None)
    stats = read() if callable(read) else None
    if not isinstance(stats, Mapping) or not stats:
        return None
    return {str(k): v for k, v in stats.items()}


# --- Orbax --------------------------------------------------------------------------


def orbax_type_handler_registry(*, use_replica_parallel: bool) -> Any:
    """Orbax's default type handlers, with `jax.Array` saved replica-parallel or not.

    Built from `orbax.checkpoint.type_handlers`, spelled the same in
    orbax-checkpoint 0.11.17-0.12.8; `ArrayHandler`'s other arguments and defaults
    move between releases (`use_replica_parallel` defaulted to True in 0.11, to
    None in 0.12; 0.12 added `dispatcher`, `min_slice_bytes_for_replica_parallel`),
    so only `use_replica_parallel` is passed, always explicitly. No per-host array
    metadata store: Orbax uses it only to restore typed PRNG key arrays, which
    Titanax never saves (it stores key data).

    **Arguments:**

    - `use_replica_parallel`: whether hosts share the writing of replicated arrays
        (worth it only with more than one process).

    **Returns:** an Orbax `TypeHandlerRegistry` for a `PyTreeCheckpointHandler`.
    """
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    pairs = [
        (ty, handlers.get_type_handler(ty))
        for ty in handlers.supported_types()
        if ty is not jax.Array
    ]
    array_handler = handlers.ArrayHandler(use_replica_parallel=use_replica_parallel)
    pairs.insert(0, (jax.Array, array_handler))
    return handlers.create_type_handler_registry(*pairs)
