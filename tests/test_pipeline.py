"""Pipelined loss and gradients (GPipe and 1F1B) against the unpipelined model.

A toy stack of residual MLP layers (fp32, tiny dims); the memory and HLO tests only
compile (no run). The GPT's parity grid and TP×PP are in `test_pipeline_gpt.py`.
"""

import collections

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

from titanax._errors import PipelineError
from titanax._hlo import collectives
from titanax._mesh import make_mesh
from titanax._plan import DP, PP, Plan
from titanax._sharding import shard
from titanax.parallel.pipeline import (
    Stage,
    pipeline_schedule,
    pipeline_value_and_grad,
    ring_sizes,
    send_patterns,
)

RTOL = 1e-5


class Layer(eqx.Module):
    w: Float[Array, "embed mlp"]
    v: Float[Array, "mlp embed"]

    def __call__(self, h, key=None):
        return h + jnp.tanh(h @ self.w) @ self.v


class Toy(eqx.Module):
    emb: Float[Array, "din embed"]
    layers: Layer
    head: Float[Array, "embed dout"]

    def __init__(self, key, n_layers=8, width=8, d_in=4, d_out=3):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.emb = jax.random.normal(k1, (d_in, width)) / 2
        w = jax.random.normal(k2, (n_layers, width, 2 * width)) / width**0.5
        v = jax.random.normal(k3, (n_layers, 2 * width, width)) / width**0.5
        self.layers = Layer(w, v)
        self.head = jax.random.normal(k4, (width, d_out)) / width**0.5


def _post(model, h, batch, key):
    err = h @ model.head - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


TOY_STAGE = Stage(
    where=lambda m: m.layers,
    pre=lambda m, b, key: b["x"] @ m.emb,
    post=_post,
)


def _toy_loss(model, batch):
    h = batch["x"] @ model.emb
    h, _ = jax.lax.scan(lambda h, layer: (layer(h), None), h, model.layers)
    return _post(model, h, batch, None)


def _toy_batch(n, key=1):
    kx, ky = jax.random.split(jax.random.key(key))
    return {"x": jax.random.normal(kx, (n, 4)), "y": jax.random.normal(ky, (n, 3))}


def _mesh(pipe, data=1):
    devices = jax.devices()[: pipe * data]
    if data > 1:
        return make_mesh(devices, data=data, pipe=pipe)
    return make_mesh(devices, pipe=pipe)


def _plan(schedule, microbatches, data=False):
    pp = PP("pipe", microbatches=microbatches, schedule=schedule)
    return Plan(dp=DP("data") if data else None, pp=pp)


def _pipelined(stage, model, batch, plan, mesh, key=None):
    placed = shard(model, plan, mesh)

    def run(m, b):
        return pipeline_value_and_grad(stage, m, b, key, plan=plan, mesh=mesh)

    return jax.jit(run)(placed, batch)


def _assert_close(got, want):
    got, want = eqx.filter(got, eqx.is_array), eqx.filter(want, eqx.is_array)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(float(np.max(np.abs(w))), 1e-30)
        rel = float(np.max(np.abs(g - w))) / scale
        assert rel <= RTOL, f"{jax.tree_util.keystr(path)}: relative error {rel:.2e}"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(
    "stages,microbatches", [(s, k * s) for s in (2, 4) for k in (1, 2, 4)]
)
def test_toy_parity(schedule, stages, microbatches):
    model, batch = Toy(jax.random.key(0)), _toy_batch(32)
    (want_loss, want_metrics), want = eqx.filter_value_and_grad(
        _toy_loss, has_aux=True
    )(model, batch)
    plan, mesh = _plan(schedule, microbatches), _mesh(stages)
    loss, metrics, grads = _pipelined(TOY_STAGE, model, batch, plan, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    np.testing.assert_allclose(metrics["mae"], want_metrics["mae"], rtol=RTOL)
    _assert_close(grads, want)
    # The layers' gradient stays split over the stages.
    assert grads.layers.w.sharding.spec[0] == "pipe"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dp_x_pp_parity(schedule):
    model, batch = Toy(jax.random.key(0)), _toy_batch(32)
    (want_loss, _), want = eqx.filter_value_and_grad(_toy_loss, has_aux=True)(
        model, batch
    )
    plan, mesh = _plan(schedule, 4, data=True), _mesh(pipe=2, data=4)
    loss, _, grads = _pipelined(TOY_STAGE, model, batch, plan, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    _assert_close(grads, want)


def test_gradient_scale_and_dropout_key():
    model, batch = Toy(jax.random.key(0)), _toy_batch(16)
    plan, mesh = _plan("1f1b", 2), _mesh(2)
    _, _, grads = _pipelined(TOY_STAGE, model, batch, plan, mesh)

    def scaled(m, b):
        return pipeline_value_and_grad(
            TOY_STAGE, m, b, jax.random.key(0), plan=plan, mesh=mesh, scale=8.0
        )

    _, _, big = jax.jit(scaled)(shard(model, plan, mesh), batch)
    _assert_close(jax.tree.map(lambda g: g / 8.0, big), grads)


def _compiled(schedule, microbatches, data=1, rows_per_micro=4):
    model = Toy(jax.random.key(0), n_layers=4, width=32)
    plan, mesh = _plan(schedule, microbatches, data=data > 1), _mesh(2, data)
    batch = _toy_batch(rows_per_micro * microbatches * data)
    placed = shard(model, plan, mesh)

    def run(m, b):
        return pipeline_value_and_grad(TOY_STAGE, m, b, None, plan=plan, mesh=mesh)

    return jax.jit(run).lower(placed, batch).compile(), mesh


def test_memory_1f1b_flat_gpipe_grows():
    """Fixed microbatch size: 1F1B's temporaries do not grow with M; GPipe's do."""
    temp = {
        (schedule, m): _compiled(schedule, m)[0].memory_analysis().temp_size_in_bytes
        for schedule in ("gpipe", "1f1b")
        for m in (4, 16)
    }
    assert temp[("1f1b", 16)] <= 1.25 * temp[("1f1b", 4)], temp
    assert temp[("gpipe", 16)] >= 1.3 * temp[("gpipe", 4)], temp


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_hlo_boundary_permutes_and_one_dp_reduction(schedule):
    compiled, mesh = _compiled(schedule, 4, data=4)
    found = collectives(compiled.as_text(), mesh)
    permutes = [c for c in found if c.kind == "collective-permute"]
    # One permute op per distinct send pattern of a tick (each tick runs one), of
    # one microbatch's boundary activations (4 rows x 32 fp32), over `pipe` only.
    # S=2, M=4. 1F1B: stage 0 -> 1, 1 -> 0, or both at once. GPipe: 0 -> 1 in the
    # forward ticks that carry a microbatch, and its transpose in the backward.
    _, patterns = send_patterns(pipeline_schedule("1f1b", 2, 4))
    want = sum(1 for p in patterns if p) if schedule == "1f1b" else 2
    assert len(permutes) == want == (3 if schedule == "1f1b" else 2), permutes
    assert all(c.in_loop and c.axes == ("pipe",) for c in permutes)
    assert all(c.bytes == 4 * 32 * 4 for c in permutes)
    data_reductions = [c for c in found if "data" in c.axes]
    assert data_reductions and not any(c.in_loop for c in data_reductions)
    counts = collections.Counter(c.kind for c in found if c.in_loop)
    assert set(counts) == {"collective-permute"}, counts


def test_ring_buffers_bounded_by_stages():
    for stages, microbatches in [(2, 2), (2, 8), (4, 4), (4, 16)]:
        k_act, k_cot = ring_sizes(pipeline_schedule("1f1b", stages, microbatches))
        assert k_act <= stages and k_cot <= stages


def test_bad_input():
    model, batch = Toy(jax.random.key(0), n_layers=6), _toy_batch(32)
    mesh = _mesh(4)
    with pytest.raises(PipelineError, match="do not divide"):
        pipeline_value_and_grad(
            TOY_STAGE, model, batch, None, plan=_plan("gpipe", 4), mesh=mesh
        )
    model = Toy(jax.random.key(0))
    with pytest.raises(PipelineError, match="multiple of 12"):
        pipeline_value_and_grad(
            TOY_STAGE, model, batch, None, plan=_plan("gpipe", 12), mesh=mesh
        )
    with pytest.raises(PipelineError, match="at least as many"):
        pipeline_value_and_grad(
            TOY_STAGE, model, _toy_batch(2), None, plan=_plan("1f1b", 2), mesh=mesh
        )
    with pytest.raises(PipelineError, match="plan.pp. uses mesh axis"):
        pipeline_value_and_grad(
            TOY_STAGE,
            model,
            batch,
            None,
            plan=_plan("gpipe", 4),
            mesh=make_mesh(jax.devices()[:2], data=2),
        )
    no_stack = Stage(where=lambda m: m.head, pre=TOY_STAGE.pre, post=_post)
    with pytest.raises(PipelineError, match="leading logical `layers` dim"):
        pipeline_value_and_grad(
            no_stack, model, batch, None, plan=_plan("gpipe", 4), mesh=mesh
        )
    with pytest.raises(PipelineError, match="`pp=tx.PP"):
        pipeline_value_and_grad(
            TOY_STAGE, model, batch, None, plan=Plan(dp=DP("pipe")), mesh=mesh
        )


REMAT = {
    "none": False,
    "full": True,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def test_remat_policies_keep_gradients_and_cut_gpipe_memory():
    model = Toy(jax.random.key(0), n_layers=8, width=32)
    batch = _toy_batch(64)
    plan, mesh = _plan("gpipe", 8), _mesh(2)
    placed = shard(model, plan, mesh)
    grads, temp = {}, {}
    for name, remat in REMAT.items():
        stage = Stage(where=TOY_STAGE.where, pre=TOY_STAGE.pre, post=_post, remat=remat)

        def run(m, b, stage=stage):
            return pipeline_value_and_grad(stage, m, b, None, plan=plan, mesh=mesh)

        compiled = jax.jit(run).lower(placed, batch).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
        grads[name] = compiled(placed, batch)[2]
    for name in ("full", "dots_saveable"):
        _assert_close(grads[name], grads["none"])
    # Full remat keeps one input per layer instead of its hidden activations.
    assert temp["full"] < 0.8 * temp["none"], temp
    assert temp["full"] <= temp["dots_saveable"] <= temp["none"], temp


def test_remat_must_be_a_bool_or_a_policy():
    with pytest.raises(PipelineError, match="remat"):
        Stage(where=TOY_STAGE.where, pre=TOY_STAGE.pre, post=_post, remat="yes")
