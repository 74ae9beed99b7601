"""Collectives by axis name, checked against the mesh the current trace runs under.

Each function here wraps one `jax.lax` collective. It maps over the leaves of a PyTree,
accepts a mesh axis name or a tuple of names, and checks the names *before* the
primitive is traced: a name the mesh lacks raises `CollectiveError` listing the mesh's
axes and the closest name, however deeply the call is nested (inside `jax.jit`,
`jax.lax.scan`, `jax.grad`, ... within `tx.spmd` or `jax.shard_map`).

Where the known axes come from: `jax.sharding.get_abstract_mesh()`. Inside
`jax.shard_map` (which `tx.spmd` wraps) it returns the mesh with the mapped axes marked
*manual*, and it does so under nested `jax.jit` too; those manual axes are the names a
collective may use. Axis names bound by `jax.vmap(..., axis_name=...)` are accepted as
well.

Shape vocabulary: **stacked** results gain a new dim of the axis size; **tiled** results
concatenate the per-device pieces along an existing dim.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._compat import mark_varying, trace_mesh_axes, varying_axes
from .._errors import CollectiveError

__all__ = [
    "all_gather",
    "all_to_all",
    "axis_index",
    "axis_size",
    "broadcast",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "psum",
    "pvary",
    "reduce_scatter",
    "shift",
]

AxisName = str | tuple[str, ...]


# --- the tx.spmd context ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SpmdContext:
    """What `tx.spmd` knows while it traces a body (set by `titanax.parallel._spmd`).

    - `batch_axes`: the manual mesh axes the batch is split over.
    - `manual_axes`: every manual axis of the body.
    - `check_vma`: whether `jax.shard_map` tracks varying/invariant types.
    """

    batch_axes: tuple[str, ...]
    manual_axes: tuple[str, ...]
    check_vma: bool


_SPMD_CONTEXT: contextvars.ContextVar[_SpmdContext | None] = contextvars.ContextVar(
    "titanax_spmd_context", default=None
)


def _spmd_context() -> _SpmdContext | None:
    return _SPMD_CONTEXT.get()


# --- axis validation ----------------------------------------------------------------


def _as_names(axis: Any, who: str) -> tuple[str, ...]:
    names = axis if isinstance(axis, tuple | list) else (axis,)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise CollectiveError(
            f"`tx.collectives.{who}` expects a mesh axis name (a str) or a tuple of "
            f"names, got {axis!r}.",
            suggestion=f'Write e.g. `tx.collectives.{who}(x, "data")`.',
        )
    if len(set(names)) != len(names):
        raise CollectiveError(
            f"`tx.collectives.{who}` got axis {tuple(names)!r}, which repeats a name.",
            suggestion="Name each mesh axis at most once.",
        )
    return tuple(names)


def _bound_outside_mesh(name: str) -> bool:
    """True if `name` is bound by something other than the mesh (`jax.vmap`)."""
    try:
        jax.lax.axis_size(name)
    except NameError:
        return False
    return True


def _manual_axes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all mesh axis names, manual ones) of the mesh the current trace runs under."""
    return trace_mesh_axes()


def _check_axes(axis: Any, who: str) -> tuple[str, ...]:
    """Validate `axis` against the current mesh; return it as a tuple of names."""
    names = _as_names(axis, who)
    mesh_axes, manual = _manual_axes()
    for name in names:
        if name in manual or _bound_outside_mesh(name):
            continue
        if not manual:
            where = (
                f" The current mesh {mesh_axes} has no manual axes here."
                if mesh_axes
                else " No mesh is active."
            )
            raise CollectiveError(
                f"`tx.collectives.{who}` got axis {name!r} outside a per-device "
                f"program.{where}",
                suggestion=(
                    "Collectives must run inside `tx.spmd` (or `jax.shard_map`), "
                    "which maps the mesh axes they name."
                ),
            )
        if name in mesh_axes:
            raise CollectiveError(
                f"`tx.collectives.{who}` got axis {name!r}, which is in the mesh "
                f"{mesh_axes} but is not manual in this `shard_map` (manual axes: "
                f"{manual}).",
                suggestion=(
                    f"Add {name!r} to the `axis_names` of `tx.spmd`/`jax.shard_map`, "
                    f"or use one of {manual}."
                ),
            )
        close = difflib.get_close_matches(name, manual, n=1)
        raise CollectiveError(
            f"`tx.collectives.{who}` got axis {name!r}, but the mesh has axes "
            f"{mesh_axes}.",
            suggestion=(
                f"did you mean {close[0]!r}?" if close else f"use one of {manual}."
            ),
        )
    return names


def _lax_axis(names: tuple[str, ...]) -> AxisName:
    return names[0] if len(names) == 1 else names


def _size(names: tuple[str, ...]) -> int:
    return math.prod(int(jax.lax.axis_size(n)) for n in names)


# --- varying/invariant types --------------------------------------------------------


def _typed_axes(leaf: Any) -> frozenset[str] | None:
    """Axes along which `leaf`'s type says it varies (or is (un)reduced).

    `None` if `leaf` carries no such type (a Python number, or outside `shard_map`).
    """
    return varying_axes(leaf)


def _mark_varying_leaf(leaf: Any, names: tuple[str, ...]) -> Any:
    if not isinstance(leaf, jax.Array | np.ndarray | np.generic):
        return leaf
    typed = _typed_axes(leaf)
    missing = tuple(n for n in names if typed is None or n not in typed)
    if not missing:
        return leaf
    return mark_varying(leaf, missing)


def _varying_mark(tree: Any, names: tuple[str, ...]) -> Any:
    """Mark every array leaf of `tree` varying along `names` (no validation)."""
    if not names:
        return tree
    return jax.tree.map(lambda leaf: _mark_varying_leaf(leaf, names), tree)


_INVARIANT_REDUCE = (
    "`tx.collectives.{who}` got a value that is already invariant along {axes} "
    "(identical on every device), at leaf {path}. {effect}"
)
_INVARIANT_FIX = (
    "If these are gradients of replicated parameters, `jax.grad` has already summed "
    "them over the axis (shard_map's check_vma rule), so reducing again is the N× "
    "gradient trap. Take gradients with `tx.value_and_grad`/`tx.grad`, which mark the "
    "parameters varying first; then `{who}` gives the right answer. If the value is "
    "meant to be replicated, drop the `{who}`."
)


def _refuse_invariant(tree: Any, names: tuple[str, ...], who: str) -> None:
    """Inside `tx.spmd` with check_vma, refuse to reduce an invariant float array."""
    ctx = _spmd_context()
    if ctx is None or not ctx.check_vma:
        return
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in flat:
        if not isinstance(leaf, jax.Array) or not jnp.issubdtype(
            leaf.dtype, jnp.inexact
        ):
            continue
        typed = _typed_axes(leaf)
        if typed is None:
            continue
        invariant = tuple(n for n in names if n in ctx.manual_axes and n not in typed)
        if invariant:
            effect = (
                "`pmean` of it does nothing."
                if who == "pmean"
                else "`psum` of it multiplies it by the axis size."
            )
            raise CollectiveError(
                _INVARIANT_REDUCE.format(
                    who=who,
                    axes=invariant,
                    path=jax.tree_util.keystr(path) or "(root)",
                    effect=effect,
                ),
                suggestion=_INVARIANT_FIX.format(who=who),
            )


# --- helpers ------------------------------------------------------------------------


def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    return jax.tree.map(fn, tree)


def _check_dim(dim: int, ndim: int, who: str, what: str, shape: Any) -> int:
    if not isinstance(dim, int | np.integer) or not -ndim <= dim < ndim:
        raise CollectiveError(
            f"`tx.collectives.{who}` got {what}={dim!r} for a leaf of shape "
            f"{tuple(shape)} (valid: {-ndim}..{ndim - 1}).",
            suggestion=f"Pass a `{what}` in range.",
        )
    return int(dim) % ndim


# --- reductions ---------------------------------------------------------------------


def psum(x: Any, axis: AxisName) -> Any:
    """Sum over a mesh axis; every device gets the total.

    **Arguments:**

    - `x`: a PyTree of arrays (each device's values).
    - `axis`: a mesh axis name, or a tuple of names to reduce over several.

    **Returns:** a PyTree like `x` (same shapes) holding the sum over the axis.

    **Raises:** `CollectiveError` for an axis the mesh lacks; inside `tx.spmd`, for a
    floating-point array that is already invariant along `axis` (see `tx.spmd`: the
    gradient rule).

    !!! Example
        ```python
        # mesh data=8; device i holds x = [i]         (per-device shape (1,))
        tx.collectives.psum(x, "data")  # [28] on every device, shape (1,)
        ```
    """
    names = _check_axes(axis, "psum")
    _refuse_invariant(x, names, "psum")
    return jax.lax.psum(x, _lax_axis(names))


def pmean(x: Any, axis: AxisName) -> Any:
    """Mean over a mesh axis; every device gets the mean.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.

    **Returns:** a PyTree like `x` (same shapes) holding the mean over the axis.

    **Raises:** `CollectiveError` for an axis the mesh lacks; inside `tx.spmd`, for a
    floating-point array already invariant along `axis` (typically gradients taken
    with plain `jax.grad` of replicated parameters: the N× trap).

    !!! Example
        ```python
        # mesh data=8; device i holds g = [i]
        tx.collectives.pmean(g, "data")  # [3.5] on every device, shape (1,)
        ```
    """
    names = _check_axes(axis, "pmean")
    _refuse_invariant(x, names, "pmean")
    return jax.lax.pmean(x, _lax_axis(names))


def pmax(x: Any, axis: AxisName) -> Any:
    """Elementwise maximum over a mesh axis.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.

    **Returns:** a PyTree like `x` (same shapes).

    !!! Example
        ```python
        # mesh data=8; device i holds x = [i, -i]
        tx.collectives.pmax(x, "data")  # [7, 0] on every device
        ```
    """
    names = _check_axes(axis, "pmax")
    return jax.lax.pmax(x, _lax_axis(names))


def pmin(x: Any, axis: AxisName) -> Any:
    """Elementwise minimum over a mesh axis.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.

    **Returns:** a PyTree like `x` (same shapes).

    !!! Example
        ```python
        # mesh data=8; device i holds x = [i, -i]
        tx.collectives.pmin(x, "data")  # [0, -7] on every device
        ```
    """
    names = _check_axes(axis, "pmin")
    return jax.lax.pmin(x, _lax_axis(names))


# --- gathers and scatters -----------------------------------------------------------


def all_gather(x: Any, axis: AxisName, *, dim: int = 0, tiled: bool = False) -> Any:
    """Gather every device's array along a mesh axis.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names (gathered in mesh order).
    - `dim`: stacked: where the new dim goes (`0..ndim`); tiled: the dim to
        concatenate along.
    - `tiled`: `False` stacks the pieces in a new dim of size N (the axis size);
        `True` concatenates them, so `dim` grows N times.

    **Returns:** a PyTree: each leaf shaped `x.shape` with N inserted at `dim`
    (stacked) or `x.shape[dim] * N` (tiled). Under check_vma the result is typed
    varying, as in `jax.lax.all_gather` (its transpose is a reduce-scatter, as FSDP
    needs).

    !!! Example
        ```python
        # mesh data=4; device i holds x = [i, i] (shape (2,))
        tx.collectives.all_gather(x, "data")  # (4, 2): [[0,0],[1,1],[2,2],[3,3]]
        tx.collectives.all_gather(x, "data", tiled=True)  # (8,): [0,0,1,1,2,2,3,3]
        ```
    """
    names = _check_axes(axis, "all_gather")

    def leaf(v: Any) -> Any:
        v = jnp.asarray(v)
        if tiled:
            d = _check_dim(dim, v.ndim, "all_gather", "dim", v.shape)
        else:
            d = _check_dim(dim, v.ndim + 1, "all_gather", "dim", v.shape)
        return jax.lax.all_gather(v, _lax_axis(names), axis=d, tiled=tiled)

    return _tree_map(leaf, x)


def reduce_scatter(x: Any, axis: AxisName, *, dim: int = 0, tiled: bool = False) -> Any:
    """Sum over a mesh axis, each device keeping only its slice of the result.

    **Arguments:**

    - `x`: a PyTree of arrays, the same shape on every device.
    - `axis`: a mesh axis name, or a tuple of names.
    - `dim`: the dim that is scattered.
    - `tiled`: `False`: `x.shape[dim]` must equal N (the axis size) and the dim is
        removed, device i keeping `sum(x)[i]`. `True`: `x.shape[dim]` must be a
        multiple of N and device i keeps the i-th of N equal chunks along `dim`.

    **Returns:** a PyTree: each leaf shaped `x.shape` without `dim` (stacked) or with
    `x.shape[dim] // N` (tiled).

    !!! Example
        ```python
        # mesh data=4; every device holds x = [0, 1, 2, 3, 4, 5, 6, 7] * (i + 1)
        tx.collectives.reduce_scatter(x, "data", tiled=True)
        # device i: (2,) = 10 * [2i, 2i + 1]   (sum over devices, i-th chunk)
        ```
    """
    names = _check_axes(axis, "reduce_scatter")
    n = _size(names)

    def leaf(v: Any) -> Any:
        v = jnp.asarray(v)
        d = _check_dim(dim, v.ndim, "reduce_scatter", "dim", v.shape)
        ok = v.shape[d] % n == 0 if tiled else v.shape[d] == n
        if not ok:
            need = f"a multiple of {n}" if tiled else f"exactly {n}"
            raise CollectiveError(
                f"`tx.collectives.reduce_scatter` over {names} (size {n}) with "
                f"tiled={tiled} needs dim {d} to be {need}, got shape {v.shape}.",
                suggestion=(
                    "Pad or reshape the array, or use tiled=True for chunks."
                    if not tiled
                    else "Pad the dim to a multiple of the axis size."
                ),
            )
        return jax.lax.psum_scatter(
            v, _lax_axis(names), scatter_dimension=d, tiled=tiled
        )

    return _tree_map(leaf, x)


def broadcast(x: Any, axis: AxisName, *, source: int = 0) -> Any:
    """Copy the value of the device at index `source` along a mesh axis to all.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names (then `source` indexes the
        devices of those axes in mesh order).
    - `source`: the index along `axis` whose value is kept.

    **Returns:** a PyTree like `x` (same shapes and dtypes), equal on every device of
    the axis and typed invariant along it. Implemented as an all-reduce of the source's
    value masked elsewhere (`jax.lax.pbroadcast` lowers only on GPU).

    !!! Example
        ```python
        # mesh data=8; device i holds x = [i, 10 * i]
        tx.collectives.broadcast(x, "data", source=3)  # [3, 30] everywhere
        ```
    """
    names = _check_axes(axis, "broadcast")
    n = _size(names)
    if not isinstance(source, int | np.integer) or not 0 <= source < n:
        raise CollectiveError(
            f"`tx.collectives.broadcast` got source={source!r}, but axis {names} has "
            f"{n} devices.",
            suggestion=f"Pass a source index in 0..{n - 1}.",
        )
    # `jax.lax.pbroadcast` has no CPU lowering in jax 0.10.2 (GPU only), so this is a
    # masked all-reduce: portable, differentiable, and typed invariant (replicated),
    # so the result can be returned under `P()`.
    lax_axis = _lax_axis(names)
    is_source = jax.lax.axis_index(lax_axis) == int(source)

    def leaf(v: Any) -> Any:
        v = jnp.asarray(v)
        picked = jnp.where(is_source, v, jnp.zeros_like(v))
        return jax.lax.psum(picked, lax_axis).astype(v.dtype)

    return _tree_map(leaf, x)


def all_to_all(
    x: Any, axis: AxisName, *, split_dim: int, concat_dim: int, tiled: bool = True
) -> Any:
    """Split a dim into N chunks, send chunk j to device j, concatenate what arrives.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.
    - `split_dim`: the dim split into N (the axis size) chunks.
    - `concat_dim`: the dim along which the received chunks are joined, in source
        device order.
    - `tiled`: `True`: `split_dim` shrinks N times and `concat_dim` grows N times.
        `False`: `x.shape[split_dim]` must be N; it is removed and a new dim of size
        N (the source device) is inserted at `concat_dim`.

    **Returns:** a PyTree of the resharded arrays.

    !!! Example
        ```python
        # mesh data=4; global (8, 4) array sharded by rows: device i holds rows
        # 2i..2i+1, shape (2, 4). Reshard it by columns instead:
        y = tx.collectives.all_to_all(x, "data", split_dim=1, concat_dim=0)
        # device j: shape (8, 1), column j of the global array
        ```
    """
    names = _check_axes(axis, "all_to_all")
    n = _size(names)

    def leaf(v: Any) -> Any:
        v = jnp.asarray(v)
        s = _check_dim(split_dim, v.ndim, "all_to_all", "split_dim", v.shape)
        c = _check_dim(concat_dim, v.ndim, "all_to_all", "concat_dim", v.shape)
        ok = v.shape[s] % n == 0 if tiled else v.shape[s] == n
        if not ok:
            need = f"a multiple of {n}" if tiled else f"exactly {n}"
            raise CollectiveError(
                f"`tx.collectives.all_to_all` over {names} (size {n}) with "
                f"tiled={tiled} needs split_dim {s} to be {need}, got shape "
                f"{v.shape}.",
                suggestion="Choose a split_dim the axis size divides.",
            )
        return jax.lax.all_to_all(v, _lax_axis(names), s, c, tiled=tiled)

    return _tree_map(leaf, x)


# --- permutations -------------------------------------------------------------------


def ppermute(x: Any, axis: AxisName, perm: Sequence[tuple[int, int]]) -> Any:
    """Send each device's value to another device along a mesh axis.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.
    - `perm`: `(source, destination)` index pairs along `axis`; each source and each
        destination at most once. Devices no pair sends to receive zeros.

    **Returns:** a PyTree like `x` (same shapes).

    !!! Example
        ```python
        # mesh data=4; device i holds x = [i]
        tx.collectives.ppermute(x, "data", [(0, 1), (1, 2), (2, 3)])
        # devices 0..3 now hold [0], [0], [1], [2]   (device 0 got nothing: zeros)
        ```
    """
    names = _check_axes(axis, "ppermute")
    n = _size(names)
    pairs = []
    for pair in perm:
        try:
            src, dst = (int(i) for i in pair)
        except (TypeError, ValueError):
            raise CollectiveError(
                f"`tx.collectives.ppermute` expects (source, destination) int pairs, "
                f"got {pair!r} in perm.",
                suggestion="Write e.g. `perm=[(0, 1), (1, 0)]`.",
            ) from None
        if not (0 <= src < n and 0 <= dst < n):
            raise CollectiveError(
                f"`tx.collectives.ppermute` got pair {(src, dst)}, but axis {names} "
                f"has {n} devices.",
                suggestion=f"Use indices in 0..{n - 1}.",
            )
        pairs.append((src, dst))
    for k, what in ((0, "source"), (1, "destination")):
        seen = [p[k] for p in pairs]
        dup = sorted({i for i in seen if seen.count(i) > 1})
        if dup:
            raise CollectiveError(
                f"`tx.collectives.ppermute` got {what} index {dup[0]} more than once "
                f"in perm {pairs}.",
                suggestion="A permutation names each source and destination once.",
            )
    return jax.lax.ppermute(x, _lax_axis(names), pairs)


def shift(x: Any, axis: AxisName, offset: int = 1) -> Any:
    """Cyclic shift along a mesh axis: device i sends to device `(i + offset) % N`.

    The usual pipeline hand-off (`offset=1`: each stage passes its output on; the last
    wraps around to the first) and ring algorithms.

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.
    - `offset`: how far to send, negative for backwards.

    **Returns:** a PyTree like `x`: device j holds what device `(j - offset) % N` had.

    !!! Example
        ```python
        # mesh pipe=4; device i holds x = [i]
        tx.collectives.shift(x, "pipe")      # devices hold [3], [0], [1], [2]
        tx.collectives.shift(x, "pipe", -1)  # devices hold [1], [2], [3], [0]
        ```
    """
    names = _check_axes(axis, "shift")
    n = _size(names)
    if not isinstance(offset, int | np.integer):
        raise CollectiveError(
            f"`tx.collectives.shift` expects an int offset, got {offset!r}.",
            suggestion="Write e.g. `shift(x, 'pipe', 1)`.",
        )
    perm = [(i, (i + int(offset)) % n) for i in range(n)]
    return jax.lax.ppermute(x, _lax_axis(names), perm)


# --- indices and marking ------------------------------------------------------------


def axis_index(axis: AxisName) -> jax.Array:
    """This device's index along a mesh axis (an int32 scalar).

    **Arguments:**

    - `axis`: a mesh axis name, or a tuple of names (then the index is row-major over
        those axes, as for the other collectives).

    **Returns:** an int32 scalar in `0..N-1`.

    !!! Example
        ```python
        # mesh data=2, model=4; the device at (1, 2):
        tx.collectives.axis_index("model")              # 2
        tx.collectives.axis_index(("data", "model"))    # 1 * 4 + 2 = 6
        ```
    """
    names = _check_axes(axis, "axis_index")
    return jax.lax.axis_index(_lax_axis(names))


def axis_size(axis: AxisName) -> int:
    """The number of devices along a mesh axis (a Python int, known at trace time).

    **Arguments:**

    - `axis`: a mesh axis name, or a tuple of names (the product of their sizes).

    **Returns:** an `int`.

    !!! Example
        ```python
        # mesh data=2, model=4
        tx.collectives.axis_size(("data", "model"))  # 8
        ```
    """
    names = _check_axes(axis, "axis_size")
    return _size(names)


def pvary(x: Any, axis: AxisName) -> Any:
    """Mark a PyTree's arrays as varying along mesh axes (no data moves).

    Under `check_vma`, a replicated value is typed *invariant*; differentiating through
    it sums its gradient over the axis. After `pvary`, each device's gradient is its own
    (local) one, to be reduced explicitly. Also needed for scan carries that start
    invariant but become varying. Leaves already varying along an axis are left as they
    are (unlike `jax.lax.pcast`, which refuses them).

    **Arguments:**

    - `x`: a PyTree of arrays.
    - `axis`: a mesh axis name, or a tuple of names.

    **Returns:** `x`, with the same values, typed varying along `axis`.

    !!! Example
        ```python
        w = tx.collectives.pvary(params, "data")
        g = jax.grad(loss)(w, batch)          # local gradient, typed varying
        g = tx.collectives.pmean(g, "data")   # the data-parallel gradient
        ```
    """
    names = _check_axes(axis, "pvary")
    return _varying_mark(x, names)
