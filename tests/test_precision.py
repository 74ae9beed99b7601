"""`tx.Precision`: bf16 compute on float32 master weights, fp16 dynamic loss scaling.
8 simulated CPU devices (conftest)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mlp_case import host, make_batch, make_model

import titanax as tx
from models.mlp import cross_entropy_loss


def build(precision, optimizer=None):
    return tx.make_train_step(
        cross_entropy_loss,
        optimizer if optimizer is not None else optax.adamw(1e-2),
        tx.Plan(dp=tx.DP("data")),
        tx.make_mesh(data=8),
        precision=precision,
    )


def float_dtypes(tree):
    return {
        x.dtype
        for x in jax.tree.leaves(tree)
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)
    }


def test_reduced_precision_trains_on_float32_master_weights():
    batch = make_batch()
    first = {}
    for precision in (
        tx.Precision.fp32(),
        tx.Precision.bf16(),
        tx.Precision.fp16(),
    ):
        ts = build(precision)
        state = ts.init(make_model(), 0)
        losses = []
        for _ in range(10):  # one batch, again and again: the loss must fall
            state, metrics = ts.step(state, batch)
            losses.append(float(metrics["loss"]))
        first[precision.name] = losses[0]
        assert losses[-1] < 0.8 * losses[0], (precision.name, losses)
        assert float_dtypes(state.model) == {jnp.dtype(jnp.float32)}
        assert float_dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}
        assert int(state.bad_steps) == 0
    assert first["bf16"] != first["fp32"]  # it did compute in bf16
    np.testing.assert_allclose(first["bf16"], first["fp32"], rtol=2e-2)
    np.testing.assert_allclose(first["fp16"], first["fp32"], rtol=5e-3)


def test_bf16_loss_sees_bf16():
    seen = []

    def loss(model, batch, key):
        seen.append((model.layers[0].weight.dtype, batch["x"].dtype, batch["y"].dtype))
        return cross_entropy_loss(model, batch)

    ts = tx.make_train_step(
        loss,
        optax.sgd(0.1),
        tx.Plan(dp=tx.DP("data")),
        tx.make_mesh(data=8),
        precision=tx.Precision.bf16(),
    )
    state = ts.init(make_model(), 0)
    ts.step(state, make_batch())
    bf16, i32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)
    assert set(seen) == {(bf16, bf16, i32)}


def _fp16_step(ts, state, batch):
    before = host(state.model)
    state, metrics = ts.step(state, batch)
    return state, before, float(metrics["loss_scale"])


def _scale(state):
    return float(state.loss_scale.scale), int(state.loss_scale.good_steps)


def test_fp16_skips_non_finite_steps_and_adapts_the_scale():
    ts = build(tx.Precision.fp16(initial_scale=2.0**10, growth_interval=2))
    state = ts.init(make_model(), 0)
    good, bad = make_batch(), make_batch()
    bad["x"] = bad["x"] * 1e6  # overflows float16: inf activations, NaN loss
    assert _scale(state) == (1024.0, 0)

    state, before, used = _fp16_step(ts, state, good)
    assert used == 1024.0 and _scale(state) == (1024.0, 1)
    assert not np.array_equal(
        host(state.model).layers[0].weight, before.layers[0].weight
    )

    state, before, used = _fp16_step(ts, state, bad)  # skipped, scale halves
    after = host(state.model)
    assert _scale(state) == (512.0, 0)
    pairs = zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert int(state.bad_steps) == 1 and int(state.first_bad_step) == 1

    state, _, _ = _fp16_step(ts, state, good)
    assert _scale(state) == (512.0, 1)
    state, _, used = _fp16_step(ts, state, good)  # growth_interval good steps
    assert used == 512.0 and _scale(state) == (1024.0, 0)
    assert int(state.step) == 4
    assert float_dtypes(state.model) == {jnp.dtype(jnp.float32)}


def test_fp16_gradient_overflow_lowers_the_scale_without_an_error():
    # A scale too large overflows the float16 gradients while the loss is finite:
    # the scaler's ordinary work, not a non-finite step for the Trainer to raise.
    scales = []
    trainer = tx.Trainer(
        make_model(),
        tx.Plan(dp=tx.DP("data")),
        optimizer=optax.adamw(1e-2),
        loss=cross_entropy_loss,
        precision=tx.Precision.fp16(initial_scale=2.0**40),
        log_every=1,
        hooks=[lambda step, metrics, trainer: scales.append(metrics["loss_scale"])],
    )
    state = trainer.fit([make_batch(seed=i) for i in range(40)])
    assert scales[0] == 2.0**40
    assert float(state.loss_scale.scale) < 2.0**20
    assert int(state.bad_steps) == 0
    # Once the scale fits, steps apply: the model moved.
    moved = host(state.model).layers[0].weight != host(make_model()).layers[0].weight
    assert moved.any()


def test_fp16_rejects_bad_settings():
    with pytest.raises(tx.TrainerError, match="initial_scale"):
        tx.Precision.fp16(initial_scale=0.0)
    with pytest.raises(tx.TrainerError, match="growth_interval"):
        tx.Precision.fp16(growth_interval=0)
