"""`tx.Activations`: a plan's activation layout, bound to a mesh, for a model to call.

Parameters get their shardings from the model's PyTree; activations exist only while
the model runs, so the model must say where they are. It does so with logical axes,
never with a mesh: it is given an `Activations` from outside (e.g. as
`GPTConfig(layout=tx.Activations(plan, mesh))`) and calls it at a few places:

- `layout.constrain(x, ("batch", "seq", "embed"))` at block boundaries (the
    residual stream): split as the plan's `activation_rules` say (`batch` over the
    data axes, `seq` over CP's axis, and over TP's with sequence parallelism); and
    with `sequence_parallel=False` on the inputs of attention and the MLP, where
    Megatron sequence parallelism gathers the sequence back.
- `layout.attention(q, k, v, names=..., kv_names=...)` for causal attention: plain
    attention, or under CP the ring (or all-gather) attention of `_ring_attention`.
- `layout.positions(T)` for position embeddings, and `layout.to_compute_order(x,
    names)` / `layout.to_natural_order(x, names)` at the model's entry and exit:
    under CP the model computes in zigzag order (the load-balanced split), so its
    positions are zigzag too, and its output comes back in the data's order.
- Under sequence parallelism (`layout.sequence_parallel`), `layout.project_in(x,
    weights, ...)` for the column-parallel projections at the input of attention
    and the MLP and `layout.project_out(x, w, ...)` for the row-parallel one at
    their output: the all-gather of the sequence and the reduce-scatter back onto
    sequence shards are written out (`jax.lax.all_gather` / `psum_scatter` in a
    `jax.shard_map`), so every backend runs them as such (XLA:CPU would otherwise
    all-reduce the whole activation and slice it).

Without CP the orders are the identity. The model never sees the mesh; the plan and
mesh are passed explicitly, never through a global or thread-local context.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._compat import shard_map
from .._errors import PlanError, ShardingError
from .._plan import Plan
from ._ring_attention import context_attention, from_zigzag, to_zigzag, zigzag_positions

__all__ = ["Activations"]

Names = Sequence[str | None]

QUERY_NAMES = ("batch", "seq", "heads", "head_dim")
RESIDUAL_NAMES = ("batch", "seq", "embed")

# The logical axes an activation may name (besides the plan's TP rules): a name
# outside them is a typo that would silently leave a dim unsplit.
ACTIVATION_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp",
                   "vocab")  # fmt: skip


def _describe(names: Names) -> str:
    return "(" + ", ".join(str(n) for n in names) + ")"


def _axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


class Activations(eqx.Module):
    """The activation layout of `plan` on `mesh`: what a model calls, with logical
    axes, to split its activations (see the module docstring for the protocol).

    Hashable and static, so it can sit in a model's frozen config. Build it with the
    plan and mesh the model is trained with.

    **Arguments:**

    - `plan`: the `tx.Plan` (its `activation_rules` decide every split).
    - `mesh`: the mesh the step runs on.

    !!! Example
        ```python
        plan = tx.Plan(dp=tx.DP("data"), cp=tx.CP("context"))
        mesh = tx.make_mesh(data=2, context=4)
        config = GPTConfig.preset("baby", layout=tx.Activations(plan, mesh))
        trainer = tx.Trainer(lambda k: GPT(config, key=k), plan, mesh=mesh, ...)
        ```
    """

    plan: Plan = eqx.field(static=True)
    mesh: Mesh = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.plan, Plan):
            raise PlanError(
                f"`tx.Activations(plan, mesh)` expects a `tx.Plan`, got "
                f"{type(self.plan).__name__}.",
                suggestion="Pass the plan the model is trained with.",
            )
        if not isinstance(self.mesh, Mesh):
            raise ShardingError(
                f"`tx.Activations(plan, mesh)` expects a `jax.sharding.Mesh`, got "
                f"{type(self.mesh).__name__}.",
                suggestion="Pass the mesh the model is trained on (`tx.make_mesh`).",
            )
        self.plan.check_mesh(self.mesh)

    # --- what the plan says ---------------------------------------------------------

    @property
    def context_parallel(self) -> bool:
        """Whether the plan has CP: attention then runs over the context axis, and
        the model computes in zigzag order."""
        return self.plan.cp is not None

    @property
    def context_size(self) -> int:
        """The number of devices the sequence is split over by CP (1 without)."""
        cp = self.plan.cp
        return 1 if cp is None else int(self.mesh.shape[cp.axis])

    @property
    def sequence_parallel(self) -> bool:
        """Whether the plan has Megatron sequence parallelism
        (`TP(sequence_parallel=True)`): the model then projects into and out of
        attention and the MLP through `project_in` and `project_out`."""
        tp = self.plan.tp
        return tp is not None and tp.sequence_parallel

    def spec(self, names: Names, *, sequence_parallel: bool = True) -> PartitionSpec:
        """The mesh `PartitionSpec` of an activation with logical axes `names`
        (`plan.activation_spec`)."""
        return self.plan.activation_spec(names, sequence_parallel=sequence_parallel)

    def _check_known(self, names: Names, what: str, where: str, who: str) -> None:
        known = list(ACTIVATION_AXES)
        if self.plan.tp is not None:
            known += [k for k, _ in self.plan.tp.rules if k not in known]
        for name in names:
            if name is not None and name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise ShardingError(
                    f"Expected the logical axes of {what} to be among {known} "
                    f"(or None), got `{name}` at `{where}` (`{who}`).{hint}",
                    path=where,
                    suggestion="Name each dim with a known logical axis, or None "
                    "for a dim that is never split.",
                )

    def _checked_spec(
        self, x: Any, names: Names, *, sequence_parallel: bool = True, who: str
    ) -> PartitionSpec:
        names = tuple(names)
        where = f"activation {_describe(names)}"
        if len(names) != x.ndim:
            raise ShardingError(
                f"Expected {x.ndim} logical axis names for an activation of shape "
                f"{tuple(x.shape)}, got {len(names)} at `{where}` (`{who}`).",
                path=where,
                suggestion='Name every dim, e.g. `("batch", "seq", "embed")`.',
            )
        self._check_known(names, "an activation", where, who)
        spec = self.spec(names, sequence_parallel=sequence_parallel)
        for dim, (name, entry) in enumerate(zip(names, spec, strict=True)):
            axes = _axes_of(entry)
            size = math.prod(self.mesh.shape[a] for a in axes)
            if x.shape[dim] % size:
                over = " x ".join(f"{a}={self.mesh.shape[a]}" for a in axes)
                raise ShardingError(
                    f"Expected `{name}` (dim {dim}) to be divisible by {size} "
                    f"({over}), got {x.shape[dim]} at `{where}` (`{who}`).",
                    path=where,
                    suggestion=f"Use a `{name}` size that is a multiple of {size}.",
                )
        return spec

    # --- what a model calls ---------------------------------------------------------

    def constrain(
        self, x: jax.Array, names: Names, *, sequence_parallel: bool = True
    ) -> jax.Array:
        """Split `x` as the plan's activation rules say for `names`
        (`jax.lax.with_sharding_constraint`).

        A model calls it on the residual stream at block boundaries, and with
        `sequence_parallel=False` on the input of attention and the MLP (the
        normalised stream): under Megatron sequence parallelism the sequence is
        split over the TP axis between them and gathered (all-gather) at their
        input; their row-parallel outputs are reduce-scattered back onto the split
        residual stream. Without sequence parallelism both are the same split.

        **Arguments:**

        - `x`: an activation.
        - `names`: its logical axes, one per dim, e.g. `("batch", "seq", "embed")`.
        - `sequence_parallel`: `False` for an input of attention or the MLP.

        **Returns:** `x`, constrained.

        **Raises:** `ShardingError` (at trace time, before compiling) for a wrong
        number of names or a dim its mesh axes do not divide.
        """
        spec = self._checked_spec(
            x, names, sequence_parallel=sequence_parallel, who="constrain"
        )
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def positions(self, length: int) -> np.ndarray:
        """The positions of the sequence as the model computes it: `0..length-1`,
        or under CP the zigzag order (device `d` holds chunks `d` and `2N-1-d`).

        **Arguments:**

        - `length`: the sequence length `T`.

        **Returns:** an int32 numpy array `(T,)`: a constant, for position
        embeddings and rotary tables.

        **Raises:** `ShardingError` if CP is on and `2N` does not divide `T`.
        """
        n = self.context_size
        if not self.context_parallel:
            return np.arange(length, dtype=np.int32)
        self._check_seq(length, "positions")
        return zigzag_positions(length, n)

    def _check_seq(self, length: int, who: str) -> None:
        n = self.context_size
        if length % (2 * n):
            assert self.plan.cp is not None
            raise ShardingError(
                f"Expected a sequence length divisible by {2 * n} (2 x "
                f"{self.plan.cp.axis}={n}: the zigzag split cuts it into {2 * n} "
                f"chunks), got {length} at `seq` (`{who}`).",
                path="seq",
                suggestion=f"Use a context length that is a multiple of {2 * n}.",
            )

    def _seq_map(self, x: jax.Array, names: Names, fn: Any, who: str) -> jax.Array:
        names = tuple(names)
        dim = self._seq_dim(names, who)
        if not self.context_parallel:
            return x
        self._check_seq(x.shape[dim], who)
        spec = self._checked_spec(x, names, sequence_parallel=False, who=who)
        assert self.plan.cp is not None
        axis, n = self.plan.cp.axis, self.context_size
        mapped = shard_map(
            lambda local: fn(local, axis, n, dim),
            mesh=self.mesh,
            in_specs=spec,
            out_specs=spec,
        )
        return mapped(x)

    def to_compute_order(self, x: jax.Array, names: Names) -> jax.Array:
        """The data's order → the model's: zigzag under CP, else `x` itself.

        Call it on the model's input (the tokens): cheap, each device exchanges
        half its block with one other device.

        **Arguments:**

        - `x`: an array with a `seq` axis, split over the context axis in data
            order (contiguous chunks, as `tx.put_batch` places batches).
        - `names`: its logical axes.

        **Returns:** `x` in zigzag order, split over the context axis.
        """
        return self._seq_map(x, names, to_zigzag, "to_compute_order")

    def to_natural_order(self, x: jax.Array, names: Names) -> jax.Array:
        """The inverse of `to_compute_order`: call it on the model's output (the
        last hidden states, before the head), so logits line up with the labels.

        **Arguments:**

        - `x`: an array with a `seq` axis, in compute order.
        - `names`: its logical axes.

        **Returns:** `x` in the data's order.
        """
        return self._seq_map(x, names, from_zigzag, "to_natural_order")

    def attention(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        names: Names = QUERY_NAMES,
        kv_names: Names | None = None,
        implementation: str | None = None,
    ) -> jax.Array:
        """Causal scaled dot-product attention, split as the plan says.

        Without CP: `jax.nn.dot_product_attention(..., is_causal=True)` (XLA
        partitions it by the batch and heads). With CP: ring attention over the CP
        axis (or all-gather attention, `CP(attention="all_gather")`), in a
        `jax.shard_map` over the whole mesh, with `q`, `k`, `v` in compute (zigzag)
        order; heads stay split over TP's axis when TP maps them.

        **Arguments:**

        - `q`: queries `(batch, seq, heads, head_dim)`.
        - `k`, `v`: keys and values `(batch, seq, kv_heads, head_dim)`; `kv_heads`
            divides `heads` (grouped-query attention).
        - `names`: the logical axes of `q` (default `("batch", "seq", "heads",
            "head_dim")`).
        - `kv_names`: those of `k` and `v` (default: `names`).
        - `implementation`: passed to `jax.nn.dot_product_attention` without CP.

        **Returns:** the attended values, shaped and split like `q`.

        **Raises:** `ShardingError` at trace time for a sequence length or a head
        count the mesh axes do not divide.
        """
        kv_names = names if kv_names is None else kv_names
        if not self.context_parallel:
            impl: Any = implementation
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=impl
            )
        assert self.plan.cp is not None
        names, kv_names = tuple(names), tuple(kv_names)
        if len(names) != 4 or names[1] != "seq" or len(kv_names) != 4:
            raise ShardingError(
                "Expected attention inputs named (batch, seq, heads, head_dim), got "
                f"{_describe(names)} and {_describe(kv_names)}.",
                path=f"activation {_describe(names)}",
                suggestion="Lay out q, k and v as (batch, seq, heads, head_dim).",
            )
        self._check_seq(q.shape[1], "attention")
        q_spec = self._checked_spec(q, names, sequence_parallel=False, who="attention")
        kv_spec = self._checked_spec(
            k, kv_names, sequence_parallel=False, who="attention"
        )
        if q_spec[2] != kv_spec[2] or q.shape[2] % k.shape[2]:
            # Query head h reads key/value head h // (heads / kv_heads): both must
            # be split alike for each device to hold the pairs it needs.
            raise ShardingError(
                f"Expected the query heads ({q.shape[2]}, split over {q_spec[2]}) and "
                f"key/value heads ({k.shape[2]}, split over {kv_spec[2]}) to be split "
                "alike, with kv_heads dividing heads.",
                path=f"activation {_describe(kv_names)}",
                suggestion="Map `heads` and `kv_heads` to the same TP axis.",
            )
        axis, n = self.plan.cp.axis, self.context_size
        gather = self.plan.cp.attention == "all_gather"
        mapped = shard_map(
            lambda q, k, v: context_attention(q, k, v, axis=axis, n=n, gather=gather),
            mesh=self.mesh,
            in_specs=(q_spec, kv_spec, kv_spec),
            out_specs=q_spec,
        )
        return mapped(q, k, v)

    # --- Megatron sequence parallelism: the projections around the sublayers --------

    def _weight_spec(self, w: Any, names: Names, who: str) -> PartitionSpec:
        """The TP split of one layer's weight named `names`, as TP's rules map it.
        (FSDP's split is left to XLA: it gathers the weight where it is used.)"""
        where = f"weight {_describe(names)}"
        if len(names) != w.ndim:
            raise ShardingError(
                f"Expected {w.ndim} logical axis names for a weight of shape "
                f"{tuple(w.shape)}, got {len(names)} at `{where}` (`{who}`).",
                path=where,
                suggestion='Name every dim, e.g. `("mlp", "embed")`.',
            )
        self._check_known(names, "a weight", where, who)
        assert self.plan.tp is not None
        rules = {k: v for k, v in self.plan.tp.rules if v is not None}
        entries = [rules.get(n) if n is not None else None for n in names]
        for dim, (name, entry) in enumerate(zip(names, entries, strict=True)):
            if entry is not None and w.shape[dim] % self.mesh.shape[entry]:
                raise ShardingError(
                    f"Expected `{name}` (dim {dim}) to be divisible by "
                    f"{entry}={self.mesh.shape[entry]}, got {w.shape[dim]} at "
                    f"`{where}` (`{who}`).",
                    path=where,
                    suggestion=f"Use a `{name}` size that is a multiple of "
                    f"{self.mesh.shape[entry]}.",
                )
        return PartitionSpec(*entries)

    def _seq_dim(self, names: Names, who: str) -> int:
        if "seq" not in names:
            raise ShardingError(
                f"Expected a `seq` axis among the names {_describe(names)} "
                f"(`{who}`), got none.",
                path=f"activation {_describe(names)}",
                suggestion="Name the sequence dim `seq`.",
            )
        return list(names).index("seq")

    def project_in(
        self,
        x: jax.Array,
        weights: Sequence[jax.Array],
        *,
        names: Names = RESIDUAL_NAMES,
        w_names: Sequence[Names],
    ) -> tuple[jax.Array, ...]:
        """Column-parallel input projections `x @ w`, one per weight, at the input
        of attention or the MLP.

        Under sequence parallelism `x` arrives split along `seq` over TP's axis
        (the residual stream's layout) and each weight is split along its output
        dim. In one `jax.shard_map`, every device all-gathers the sequence of `x`
        over TP's axis (`jax.lax.all_gather`: 1/TP of `x` in, all of it out) and
        multiplies it by its columns of each weight; the sum runs over the whole
        input dim, so no partial sums are left to reduce. The gather's transpose is
        a reduce-scatter: the backward pass sends the gradient of `x` back onto
        sequence shards with one reduce-scatter of 1/TP-sized results, not with an
        all-reduce of the whole activation (what XLA:CPU makes of the same
        computation left to the partitioner). One gather serves all the weights
        (a Llama's q, k, v).

        Without sequence parallelism, or when TP's rules do not split every
        weight's output dim (there is then nothing to keep local), it is the plain
        `x @ w`, which XLA places.

        **Arguments:**

        - `x`: the normalised stream, e.g. `(batch, seq, embed)`.
        - `weights`: 2-D weights `(in, out)`, `in` the size of the last dim of
            `x`; one layer's, without the stacked `layers` dim.
        - `names`: the logical axes of `x` (default `("batch", "seq", "embed")`).
        - `w_names`: the logical axes of each weight, e.g. `[("embed", "mlp")]`.

        **Returns:** a tuple of `x @ w`, one per weight: the sequence whole (split
        as `constrain(..., sequence_parallel=False)` splits it), the last dim split
        like the weight's output dim.

        **Raises:** `ShardingError` at trace time for names that do not fit the
        arrays, a weight that is not `(in, out)`, or a dim its mesh axes do not
        divide.
        """
        who = "project_in"
        names = tuple(names)
        weights = tuple(weights)
        w_names = tuple(tuple(n) for n in w_names)
        if len(w_names) != len(weights):
            raise ShardingError(
                f"Expected one tuple of logical axis names per weight, got "
                f"{len(w_names)} for {len(weights)} weights (`{who}`).",
                suggestion='Pass e.g. `w_names=[("embed", "mlp")]`, one per weight.',
            )
        for w, wn in zip(weights, w_names, strict=True):
            if w.ndim != 2 or w.shape[0] != x.shape[-1]:
                raise ShardingError(
                    f"Expected a 2-D weight (in, out) with in = {x.shape[-1]} (the "
                    f"last dim of `x`), got shape {tuple(w.shape)} at `weight "
                    f"{_describe(wn)}` (`{who}`).",
                    path=f"weight {_describe(wn)}",
                    suggestion="Reshape the weight to (in, out) first, e.g. "
                    "`w.reshape(C, -1)`.",
                )
        if not self.sequence_parallel:
            return tuple(x @ w for w in weights)
        assert self.plan.tp is not None
        axis = self.plan.tp.axis
        seq = self._seq_dim(names, who)
        x_spec = self._checked_spec(x, names, who=who)
        w_specs = [
            self._weight_spec(w, wn, who)
            for w, wn in zip(weights, w_names, strict=True)
        ]
        out_specs = tuple(
            self._checked_spec(
                jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), x.dtype),
                (*names[:-1], wn[1]),
                sequence_parallel=False,
                who=who,
            )
            for w, wn in zip(weights, w_names, strict=True)
        )
        if axis in _axes_of(x_spec[-1]) or not all(
            s == PartitionSpec(None, axis) for s in w_specs
        ):
            return tuple(x @ w for w in weights)

        def local(x, *ws):
            # (b, t / TP, C) -> (b, t, C): this device's batch rows and (CP) chunk
            # of the sequence, now whole along TP's axis.
            x = jax.lax.all_gather(x, axis, axis=seq, tiled=True)
            return tuple(x @ w for w in ws)  # (b, t, out / TP) each

        mapped = shard_map(
            local, mesh=self.mesh, in_specs=(x_spec, *w_specs), out_specs=out_specs
        )
        return tuple(mapped(x, *weights))

    def project_out(
        self, x: jax.Array, w: jax.Array, *, names: Names, w_names: Names
    ) -> jax.Array:
        """The row-parallel output projection of attention or the MLP: `x`
        contracted over its last `w.ndim - 1` dims with the leading dims of `w`
        (`jnp.tensordot(x, w, w.ndim - 1)`).

        Under sequence parallelism the contracted dims (`heads`, `mlp`) are split
        over TP's axis, so each device's product is a partial sum of the whole
        output. In one `jax.shard_map`, each device multiplies its shards and the
        partial sums are reduce-scattered over TP's axis along `seq`
        (`jax.lax.psum_scatter`): every device receives the sum for its 1/TP of
        the sequence, which is the residual stream's layout. XLA:CPU's partitioner
        would instead all-reduce the whole activation and slice it (its pass
        pipeline has no reduce-scatter creator). The transpose is an all-gather of
        the output's gradient.

        Without sequence parallelism, or when TP's rules do not split the
        contraction (nothing to reduce), it is the plain `jnp.tensordot`, which XLA
        places.

        **Arguments:**

        - `x`: the sublayer's output before the projection, e.g. `(batch, seq,
            heads, head_dim)` or `(batch, seq, mlp)`.
        - `w`: one layer's weight, contracted dims first, e.g. `(heads, head_dim,
            embed)` or `(mlp, embed)`.
        - `names`: the logical axes of `x`.
        - `w_names`: the logical axes of `w`.

        **Returns:** the projection, with logical axes `names[:-k] + w_names[-1:]`
        (`k = w.ndim - 1`), split as `constrain` splits them: under sequence
        parallelism the sequence over TP's axis.

        **Raises:** `ShardingError` at trace time for names that do not fit the
        arrays, contracted dims of different sizes, or a dim its mesh axes do not
        divide.
        """
        who = "project_out"
        names, w_names = tuple(names), tuple(w_names)
        k = w.ndim - 1
        if k < 1 or x.ndim <= k or tuple(x.shape[x.ndim - k :]) != w.shape[:k]:
            raise ShardingError(
                f"Expected a weight whose leading dims equal the last dims of `x` "
                f"{tuple(x.shape)}, plus one output dim, got shape {tuple(w.shape)} "
                f"at `weight {_describe(w_names)}` (`{who}`).",
                path=f"weight {_describe(w_names)}",
                suggestion="Pass e.g. `x` (batch, seq, heads, head_dim) with `w` "
                "(heads, head_dim, embed).",
            )
        if not self.sequence_parallel:
            return jnp.tensordot(x, w, axes=k)
        assert self.plan.tp is not None
        axis = self.plan.tp.axis
        out_names = (*names[: x.ndim - k], w_names[-1])
        seq = self._seq_dim(out_names, who)
        x_spec = self._checked_spec(x, names, sequence_parallel=False, who=who)
        w_spec = self._weight_spec(w, w_names, who)
        out_spec = self._checked_spec(
            jax.ShapeDtypeStruct((*x.shape[: x.ndim - k], w.shape[-1]), x.dtype),
            out_names,
            who=who,
        )
        contracted = tuple(x_spec)[x.ndim - k :]
        if (
            contracted != tuple(w_spec)[:k]
            or axis not in contracted
            or w_spec[-1] is not None
            or any(axis in _axes_of(e) for e in tuple(x_spec)[: x.ndim - k])
        ):
            return jnp.tensordot(x, w, axes=k)

        def local(x, w):
            # (b, t, C): this device's share of the sum (its heads, or its slice
            # of the MLP), over its rows and (CP) chunk of the sequence.
            y = jnp.tensordot(x, w, axes=k)
            # (b, t / TP, C): summed over TP's axis, this device's sequence shard.
            return jax.lax.psum_scatter(y, axis, scatter_dimension=seq, tiled=True)

        mapped = shard_map(
            local, mesh=self.mesh, in_specs=(x_spec, w_spec), out_specs=out_spec
        )
        return mapped(x, w)
