"""The pipelined forward and backward: GPipe by autodiff, 1F1B by explicit schedule.

Both run inside one `jax.shard_map` that is manual over the `pipe` axis and the
plan's data axes (other axes, e.g. TP's `model`, stay automatic). Each device holds
its stage's `L / S` layers and its data shard of the batch, split into `M`
microbatches. Activations move forward and cotangents backward with `ppermute`
between neighbouring stages only: one collective-permute per tick, whose pair list
holds exactly that tick's real transfers (`send_patterns`), so a step moves each
microbatch across each boundary once each way and nothing in the bubble.

Gradients are taken *inside* the body with `check_vma=False`, so every gradient is
local and every reduction is explicit: the boundary parameters (`pre`/`post`, which
only stage 0 / the last stage use) are summed over `pipe`, and everything is averaged
over the data axes once, after the tick loop (never per tick).

- **GPipe**: a `lax.scan` over `M + S − 1` forward ticks, differentiated by
  `jax.value_and_grad`; autodiff keeps every tick's activations (memory grows with M).
- **1F1B**: a `lax.scan` over the ticks of `pipeline_schedule("1f1b", S, M)`; each
  device looks up its action and runs it in a `lax.switch` (idle / forward /
  backward, per stage position). A backward recomputes the stage forward with
  `jax.vjp` at the stashed stage input and accumulates weight gradients locally. The
  stash is a ring buffer of `K ≤ S` inputs whatever `M` is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ..._axes import logical_axes
from ..._compat import shard_map
from ..._errors import PipelineError
from ..._loss import split_loss_output
from ..._plan import Plan
from ._schedule import Schedule, pipeline_schedule
from ._stage import Stage

__all__ = ["pipeline_value_and_grad", "ring_sizes", "send_patterns"]


@dataclasses.dataclass(frozen=True)
class _Setup:
    axis: str
    data_axes: tuple[str, ...]
    stages: int
    microbatches: int
    layers_per_stage: int


def _check(stage: Any, model: Any, batch: Any, plan: Any, mesh: Any) -> _Setup:
    if not isinstance(stage, Stage):
        raise PipelineError(
            f"Expected a `tx.Stage`, got {type(stage).__name__}.",
            suggestion="Describe the model's stack with `tx.Stage(where=..., ...)`.",
        )
    if not isinstance(plan, Plan) or plan.pp is None:
        raise PipelineError(
            "Pipelining needs a `tx.Plan` with `pp=tx.PP(...)`.",
            suggestion='Use e.g. `tx.Plan(pp=tx.PP("pipe", microbatches=8))`.',
        )
    pp = plan.pp
    names = tuple(mesh.axis_names)
    if pp.axis not in names:
        raise PipelineError(
            f"`plan.pp` uses mesh axis `{pp.axis}`, but the mesh has axes {names}.",
            suggestion=f"Build the mesh with a `{pp.axis}` axis, e.g. "
            f"`tx.make_mesh({pp.axis}=2, data=-1)`.",
        )
    plan.check_mesh(mesh)
    if plan.fsdp is not None:
        raise PipelineError(
            "Pipelining with FSDP is not supported yet.",
            suggestion="Use `DP` with `PP` (parameters replicated over `data`).",
        )
    stages = int(mesh.shape[pp.axis])
    _, block = stage.split(model)
    _check_layers_dim(stage, model, plan)
    n_layers = stage.num_layers(block)
    if n_layers % stages:
        raise PipelineError(
            f"The stacked block has {n_layers} layers, which {stages} pipeline "
            f"stages (mesh axis `{pp.axis}`) do not divide.",
            suggestion=f"Use a `{pp.axis}` size that divides {n_layers}, or change "
            "the number of layers.",
        )
    m = pp.microbatches
    if pp.schedule == "1f1b" and m < stages:
        pipeline_schedule("1f1b", stages, m)  # raises with the fix
    shards = plan.data_parallel_size(mesh)
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        rows = np.shape(leaf)[0] if np.ndim(leaf) else None
        if rows is None or rows % (shards * m):
            where = jax.tree_util.keystr(path) or "(root)"
            raise PipelineError(
                f"The batch array at {where} has shape {np.shape(leaf)}; its leading "
                f"dim must split into {shards} data shards × {m} microbatches.",
                path=where,
                suggestion=f"Use a batch size that is a multiple of {shards * m}.",
            )
    return _Setup(pp.axis, plan.data_axes, stages, m, n_layers // stages)


def _check_layers_dim(stage: Stage, model: Any, plan: Plan) -> None:
    """The stacked block's arrays must all lead with the logical `layers` dim."""
    specs = jax.tree.leaves(
        stage.where(logical_axes(model, plan.rules)),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    bad = [tuple(p) for p in specs if not tuple(p) or tuple(p)[0] != "layers"]
    if bad or not specs:
        raise PipelineError(
            "`Stage.where` must point at a stacked block whose arrays all have a "
            f"leading logical `layers` dim; found logical axes {bad or specs}.",
            suggestion=(
                "Stack the repeated layers with `eqx.filter_vmap` (Titanax names the "
                "extra leading dim `layers`) and point `Stage(where=...)` at them."
            ),
        )


def _zeros(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _index(tree: Any, i: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree
    )


class _Local:
    """What one device needs inside the body: its stage, microbatches and keys."""

    def __init__(
        self,
        stage: Stage,
        setup: _Setup,
        rest_static: Any,
        block_static: Any,
        rest_fixed: Any,
        block_fixed: Any,
        micro: Any,
        key: jax.Array | None,
    ):
        self.stage = stage
        self.setup = setup
        self.rest_static = rest_static
        self.block_static = block_static
        self.rest_fixed = rest_fixed
        self.block_fixed = block_fixed
        self.micro = micro
        self.key = key
        self.index = jax.lax.axis_index(setup.axis)
        self.first_layer = self.index * setup.layers_per_stage

    def rest(self, rest_diff: Any) -> Any:
        return eqx.combine(rest_diff, self.rest_fixed, self.rest_static)

    def block(self, block_diff: Any) -> Any:
        return eqx.combine(block_diff, self.block_fixed, self.block_static)

    def _key(self, m: Any, which: int) -> Any:
        if self.key is None:
            return None
        return jax.random.fold_in(jax.random.fold_in(self.key, m), which)

    def pre(self, rest_diff: Any, m: Any) -> Any:
        return self.stage.pre(
            self.rest(rest_diff), _index(self.micro, m), self._key(m, 0)
        )

    def layers(self, block_diff: Any, h: Any, m: Any) -> Any:
        return self.stage.run(
            self.block(block_diff), h, self._key(m, 1), self.first_layer
        )

    def post(self, rest_diff: Any, h: Any, m: Any) -> Any:
        out = self.stage.post(
            self.rest(rest_diff), h, _index(self.micro, m), self._key(m, 2)
        )
        return split_loss_output(out, "`Stage.post`", PipelineError)


Pairs = tuple[tuple[int, int], ...]


def send_patterns(schedule: Schedule) -> tuple[list[int], list[Pairs]]:
    """The real boundary transfers of each tick of `schedule`, as one permute each.

    A stage sends at most one buffer per tick: its output after an `F` (to `s + 1`,
    unless it is the last stage) or its input's cotangent after a `B` (to `s − 1`,
    unless it is the first), and the schedules never make a stage receive two. So a
    tick's transfers are one collective-permute, with a pair list fixed by the tick.

    **Returns:** per tick, the index of its pair list; the distinct pair lists.
    """
    S = schedule.stages
    index: dict[Pairs, int] = {}
    per_tick: list[int] = []
    for t, row in enumerate(schedule.ticks):
        pairs = []
        for s, action in enumerate(row):
            if action is not None and action.kind == "F" and s < S - 1:
                pairs.append((s, s + 1))
            elif action is not None and action.kind == "B" and s > 0:
                pairs.append((s, s - 1))
        if len({dst for _, dst in pairs}) != len(pairs):
            raise PipelineError(
                f"Tick {t} of the {schedule.kind} schedule (S={S}, "
                f"M={schedule.microbatches}) sends two buffers to one stage: {pairs}.",
                suggestion="This is a Titanax bug; please report the schedule.",
            )
        per_tick.append(index.setdefault(tuple(pairs), len(index)))
    return per_tick, list(index)


def _permute_by_pattern(
    x: Any, pattern: jax.Array, patterns: list[Pairs], axis: str
) -> Any:
    """`ppermute` of `x` with the pair list `patterns[pattern]`.

    `pattern` comes from the tick, so it is the same on every device: all of them
    take the same branch and run its collective together (unlike the per-stage
    branches, which must not hold collectives)."""

    def branch(pairs: Pairs) -> Callable[[Any], Any]:
        if not pairs:
            return lambda v: jax.tree.map(jnp.zeros_like, v)
        return lambda v: jax.lax.ppermute(v, axis, list(pairs))

    if len(patterns) == 1:
        return branch(patterns[0])(x)
    return jax.lax.switch(pattern, [branch(p) for p in patterns], x)


def _gpipe(local: _Local, rest_diff: Any, block_diff: Any) -> Any:
    setup = local.setup
    S, M = setup.stages, setup.microbatches
    s = local.index
    is_first, is_last = s == 0, s == S - 1
    h_shape = jax.eval_shape(local.pre, rest_diff, 0)
    out_shape = jax.eval_shape(lambda r: local.post(r, _zeros(h_shape), 0), rest_diff)
    # Forward tick t: stage s runs microbatch t − s and sends it on if it is real
    # (the bubble ticks send nothing); autodiff reverses the same permutes.
    per_tick, patterns = _gpipe_patterns(S, M)
    pattern_j = jnp.asarray(per_tick, jnp.int32)

    def objective(rest_diff: Any, block_diff: Any) -> Any:
        def tick(recv: Any, t: jax.Array) -> Any:
            m_in = jnp.clip(t, 0, M - 1)
            h_in = jax.lax.cond(
                is_first, lambda: local.pre(rest_diff, m_in), lambda: recv
            )
            m_here = jnp.clip(t - s, 0, M - 1)  # this stage's microbatch (keys)
            h_out = local.layers(block_diff, h_in, m_here)
            m_out = t - (S - 1)
            loss, metrics = jax.lax.cond(
                is_last & (m_out >= 0),
                lambda: local.post(rest_diff, h_out, jnp.maximum(m_out, 0)),
                lambda: _zeros(out_shape),
            )
            send = _permute_by_pattern(h_out, pattern_j[t], patterns, setup.axis)
            return send, (loss, metrics)

        _, (losses, metrics) = jax.lax.scan(
            tick, _zeros(h_shape), jnp.arange(M + S - 1)
        )
        loss = jnp.sum(losses) / M
        metrics = {k: jnp.sum(v) / M for k, v in metrics.items()}
        return loss, (loss, metrics)

    (_, (loss, metrics)), (g_rest, g_block) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True
    )(rest_diff, block_diff)
    return loss, metrics, g_rest, g_block


def _gpipe_patterns(stages: int, microbatches: int) -> tuple[list[int], list[Pairs]]:
    """`send_patterns` of GPipe's forward ticks (`M + S − 1` of them): stage `s`
    sends at tick `t` if `t − s` is a microbatch (its transposes run backward)."""
    index: dict[Pairs, int] = {}
    per_tick = []
    for t in range(microbatches + stages - 1):
        pairs = tuple(
            (s, s + 1) for s in range(stages - 1) if 0 <= t - s < microbatches
        )
        per_tick.append(index.setdefault(pairs, len(index)))
    return per_tick, list(index)


def ring_sizes(schedule: Schedule) -> tuple[int, int]:
    """Ring-buffer sizes `(K_act, K_cot)` the 1F1B executor needs for `schedule`.

    Stage `s` keeps the input of microbatch `m` from when stage `s − 1` sends it (the
    end of the tick of `F` of `m` on `s − 1`) until its own `B` of `m`, in slot
    `m mod K_act`; likewise cotangents from `B` on `s + 1` until `B` on `s`, in
    `m mod K_cot`. The smallest `K` for which no slot is overwritten while still
    needed; for 1F1B both are at most `S`, whatever `M` is.
    """
    S, M = schedule.stages, schedule.microbatches

    def smallest(arrive: Callable[[int, int], int], need: Callable[[int, int], int]):
        for k in range(1, M + 1):
            if all(
                arrive(s, m2) >= need(s, m1)
                for s in range(S)
                for m1 in range(M)
                for m2 in range(m1 + k, M, k)
            ):
                return k
        return M

    def b(s: int, m: int) -> int:
        return schedule.when("B", s, m)

    k_act = smallest(lambda s, m: schedule.when("F", s - 1, m) if s > 0 else 10**9, b)
    k_cot = smallest(lambda s, m: b(s + 1, m) if s < S - 1 else 10**9, b)
    return k_act, k_cot


def _one_f_one_b(local: _Local, rest_diff: Any, block_diff: Any, scale: Any) -> Any:
    setup = local.setup
    S, M = setup.stages, setup.microbatches
    s = local.index
    schedule = pipeline_schedule("1f1b", S, M)
    k_act, k_cot = ring_sizes(schedule)
    # Per tick, per stage (padded with an idle stage on both sides so that the
    # neighbours s − 1 and s + 1 are plain lookups): 0 idle, 1 F, 2 B; microbatch.
    kinds = np.zeros((schedule.num_ticks, S + 2), np.int32)
    micro = np.zeros((schedule.num_ticks, S + 2), np.int32)
    for t, row in enumerate(schedule.ticks):
        for st, action in enumerate(row):
            if action is not None:
                kinds[t, st + 1] = 1 if action.kind == "F" else 2
                micro[t, st + 1] = action.microbatch
    kinds_j, micro_j = jnp.asarray(kinds), jnp.asarray(micro)
    per_tick, patterns = send_patterns(schedule)
    pattern_j = jnp.asarray(per_tick, jnp.int32)
    h_shape = jax.eval_shape(local.pre, rest_diff, 0)
    out_shape = jax.eval_shape(lambda r: local.post(r, _zeros(h_shape), 0), rest_diff)
    seed = jnp.asarray(1.0 if scale is None else scale, jnp.float32) / M
    zero_h = _zeros(h_shape)
    zero_rest, zero_block = _zeros(rest_diff), _zeros(block_diff)
    zero_out = _zeros(out_shape)

    # Each branch: (send_h, send_g, d_rest, d_block, (loss, metrics)).
    def idle(m, x, g):
        del m, x, g
        return zero_h, zero_h, zero_rest, zero_block, zero_out

    def f_first(m, x, g):
        del x, g
        y = local.layers(block_diff, local.pre(rest_diff, m), m)
        return y, zero_h, zero_rest, zero_block, zero_out

    def f_mid(m, x, g):
        del g
        return local.layers(block_diff, x, m), zero_h, zero_rest, zero_block, zero_out

    def b_first(m, x, g):
        del x
        _, vjp = jax.vjp(
            lambda r, b: local.layers(b, local.pre(r, m), m), rest_diff, block_diff
        )
        d_rest, d_block = vjp(g)
        return zero_h, zero_h, d_rest, d_block, zero_out

    def b_mid(m, x, g):
        _, vjp = jax.vjp(lambda b, h: local.layers(b, h, m), block_diff, x)
        d_block, d_x = vjp(g)
        return zero_h, d_x, zero_rest, d_block, zero_out

    def b_last(m, x, g):
        del g

        def f(r, b, h):
            loss, metrics = local.post(r, local.layers(b, h, m), m)
            return loss, (loss, metrics)

        _, vjp, out = jax.vjp(f, rest_diff, block_diff, x, has_aux=True)
        d_rest, d_block, d_x = vjp(seed)
        return zero_h, d_x, d_rest, d_block, out

    def b_only(m, x, g):
        del x, g

        def f(r, b):
            loss, metrics = local.post(r, local.layers(b, local.pre(r, m), m), m)
            return loss, (loss, metrics)

        _, vjp, out = jax.vjp(f, rest_diff, block_diff, has_aux=True)
        d_rest, d_block = vjp(seed)
        return zero_h, zero_h, d_rest, d_block, out

    # The last stage's forward does nothing: its backward recomputes it with the
    # head and loss, and nothing is sent on.
    branches = [idle, f_first, f_mid, b_first, b_mid, b_last, b_only]
    position = jnp.where(s == 0, 0, jnp.where(s == S - 1, 2, 1))
    if S == 1:
        position = jnp.asarray(3)
    # [position (first, mid, last, only)][kind (idle, F, B)] -> branch.
    branch_of = jnp.asarray(
        [[0, 1, 3], [0, 2, 4], [0, 0, 5], [0, 0, 6]], dtype=jnp.int32
    )

    def ring(k: int) -> Any:
        return jax.tree.map(lambda z: jnp.zeros((k, *z.shape), z.dtype), zero_h)

    def write(buf: Any, slot: Any, value: Any, when: Any) -> Any:
        return jax.tree.map(
            lambda b, v: b.at[slot].set(jnp.where(when, v, b[slot])), buf, value
        )

    def tick(carry: Any, t: jax.Array) -> Any:
        acts, cots, acc_rest, acc_block, acc_out = carry
        kind, m = kinds_j[t, s + 1], micro_j[t, s + 1]
        x = _index(acts, m % k_act)
        g = _index(cots, m % k_cot)
        out = jax.lax.switch(branch_of[position, kind], branches, m, x, g)
        send_h, send_g, d_rest, d_block, loss_out = out
        # One permute per tick, outside the per-stage branches, carrying each
        # stage's one real transfer: an activation after F, a cotangent after B.
        send = jax.tree.map(lambda a, c: jnp.where(kind == 1, a, c), send_h, send_g)
        recv = _permute_by_pattern(send, pattern_j[t], patterns, setup.axis)
        prev_m, next_m = micro_j[t, s], micro_j[t, s + 2]
        acts = write(acts, prev_m % k_act, recv, kinds_j[t, s] == 1)
        cots = write(cots, next_m % k_cot, recv, kinds_j[t, s + 2] == 2)
        carry = (
            acts,
            cots,
            _add(acc_rest, d_rest),
            _add(acc_block, d_block),
            _add(acc_out, loss_out),
        )
        return carry, None

    init = (ring(k_act), ring(k_cot), zero_rest, zero_block, zero_out)
    final, _ = jax.lax.scan(tick, init, jnp.arange(schedule.num_ticks))
    _, _, g_rest, g_block, (loss, metrics) = final
    loss = loss / M
    metrics = {k: v / M for k, v in metrics.items()}
    return loss, metrics, g_rest, g_block


def pipeline_value_and_grad(
    stage: Stage,
    model: Any,
    batch: Any,
    key: jax.Array | None,
    *,
    plan: Plan,
    mesh: Mesh,
    scale: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Loss, metrics and gradients of a pipelined model for one (global) batch.

    Runs `plan.pp`'s schedule (`"gpipe"` or `"1f1b"`) with `plan.pp.microbatches`
    microbatches over the mesh axis `plan.pp.axis`, composed with the plan's data
    parallelism. Call it inside `jax.jit` (as the training step does) with the model
    placed by the plan (stacked layers split over `pipe`).

    The loss is the mean over microbatches of `stage.post`'s loss (and the mean over
    data shards): the full-batch mean when each microbatch's loss is a mean over
    equally many examples.

    **Arguments:**

    - `stage`: the `tx.Stage` describing the model's stack and boundaries.
    - `model`: the model (an `eqx.Module`).
    - `batch`: a PyTree of arrays whose leading dim is the global batch, a multiple
        of `data shards × microbatches`.
    - `key`: a PRNG key for dropout, or `None`.
    - `plan`: a `tx.Plan` with `pp` set (and optionally `dp`, `tp`).
    - `mesh`: the mesh; its `plan.pp.axis` size is the number of stages `S`.
    - `scale`: multiply the gradients (not the loss) by this, e.g. a loss scale.

    **Returns:** `(loss, metrics, grads)`: replicated float32 scalars, and the
    gradient of every floating-point array of `model` (`None` elsewhere), sharded
    like the parameters: reduced over the data axes once, after the pipeline.

    **Raises:** `PipelineError` when the model, plan, mesh or batch do not fit (no
    stacked block, layers not divisible by stages, no `pipe` axis, batch not
    divisible by shards × microbatches, 1F1B with fewer microbatches than stages).
    """
    setup = _check(stage, model, batch, plan, mesh)
    assert plan.pp is not None
    schedule = plan.pp.schedule
    rest, block = stage.split(model)
    rest_diff, rest_other = eqx.partition(rest, eqx.is_inexact_array)
    rest_fixed, rest_static = eqx.partition(rest_other, eqx.is_array)
    block_diff, block_other = eqx.partition(block, eqx.is_inexact_array)
    block_fixed, block_static = eqx.partition(block_other, eqx.is_array)
    axis, data_axes = setup.axis, setup.data_axes
    rep, on_pipe = PartitionSpec(), PartitionSpec(axis)

    def body(rest_diff, rest_fixed, block_diff, block_fixed, batch, key):
        M = setup.microbatches
        micro = jax.tree.map(
            lambda x: x.reshape(M, x.shape[0] // M, *x.shape[1:]), batch
        )  # (M, b, ...)
        local = _Local(
            stage, setup, rest_static, block_static, rest_fixed, block_fixed, micro, key
        )
        if schedule == "gpipe":
            out = _gpipe(local, rest_diff, block_diff)
            loss, metrics, g_rest, g_block = out
            if scale is not None:
                g_rest, g_block = jax.tree.map(lambda g: g * scale, (g_rest, g_block))
        else:
            out = _one_f_one_b(local, rest_diff, block_diff, scale)
            loss, metrics, g_rest, g_block = out
        # Only the last stage has a loss; only stage 0 and the last stage touch the
        # boundary parameters: sum those over `pipe`. Then one mean over the data.
        loss, metrics, g_rest = jax.lax.psum((loss, metrics, g_rest), axis)
        if data_axes:
            loss, metrics, g_rest, g_block = jax.lax.pmean(
                (loss, metrics, g_rest, g_block), data_axes
            )
        return loss, metrics, g_rest, g_block

    def batch_spec(x: Any) -> PartitionSpec:
        return plan.batch_spec(np.ndim(x))

    def body_without_key(rest_diff, rest_fixed, block_diff, block_fixed, batch):
        return body(rest_diff, rest_fixed, block_diff, block_fixed, batch, None)

    with_key = key is not None
    mapped = shard_map(
        body if with_key else body_without_key,
        mesh=mesh,
        in_specs=(
            rep,
            rep,
            on_pipe,
            on_pipe,
            jax.tree.map(batch_spec, batch),
            rep,
        )[: 6 if with_key else 5],
        out_specs=(rep, rep, rep, on_pipe),
        axis_names=frozenset((axis, *data_axes)),
        check_vma=False,
    )
    args = (rest_diff, rest_fixed, block_diff, block_fixed, batch)
    loss, metrics, g_rest, g_block = mapped(*args, *((key,) if with_key else ()))
    grads = stage.merge(g_rest, g_block)
    # Axes other than `pipe` and the data axes (e.g. TP's `model`) are automatic in
    # the `shard_map`, and its replicated out_spec leaves the boundary parameters'
    # gradients replicated over them: put every gradient where its parameter is.
    grads = jax.tree.map(
        lambda g, s: g if g is None else jax.lax.with_sharding_constraint(g, s),
        grads,
        plan.shardings(model, mesh),
        is_leaf=lambda x: x is None,
    )
    return loss, metrics, grads
