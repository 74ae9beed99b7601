"""`tx.quickstart`: configured Trainers whose steps equal a single-device step."""

import equinox as eqx
import jax
import numpy as np
import optax
import pytest
from _mlp_case import host, make_batch, make_model

import titanax as tx
from models.mlp import cross_entropy_loss


def _single_device_sgd(batches, lr):
    """Plain JAX on one device: the reference."""
    model = make_model()
    opt = optax.sgd(lr)
    state = opt.init(eqx.filter(model, eqx.is_array))
    for batch in batches:
        grads = eqx.filter_grad(lambda m, b: cross_entropy_loss(m, b)[0])(model, batch)
        updates, state = opt.update(grads, state)
        model = eqx.apply_updates(model, updates)
    return host(model)


@pytest.mark.parametrize(
    "make, mesh_shape",
    [
        (lambda **kw: tx.quickstart.simple_data_parallel(**kw), {"data": 8}),
        (
            lambda **kw: tx.quickstart.simple_tensor_parallel(
                tp=4, rules={"mlp": "model"}, **kw
            ),
            {"data": 2, "model": 4},
        ),
        (
            lambda **kw: tx.quickstart.simple_tensor_parallel(**kw),
            {"model": 8},
        ),
    ],
    ids=["dp8", "dp2_tp4", "tp8"],
)
def test_quickstart_trainers_match_one_device(make, mesh_shape):
    batches = [make_batch(seed=s) for s in range(3)]
    trainer = make(
        model=lambda key: make_model(),
        loss=cross_entropy_loss,
        optimizer=optax.sgd(0.1),
        loggers=[],
        log_every=1,
    )
    assert dict(trainer.mesh.shape) == mesh_shape
    state = trainer.fit(batches, steps=3)
    expected = _single_device_sgd(batches, 0.1)
    got = host(state.model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if "model" in mesh_shape:  # the hidden layer really is split over `model`
        w_in = state.model.layers[0].weight
        assert w_in.sharding.shard_shape(w_in.shape)[1] == 64 // mesh_shape["model"]


def test_quickstart_defaults_and_errors():
    trainer = tx.quickstart.simple_data_parallel(
        lambda key: make_model(), cross_entropy_loss
    )
    assert tx.optim.describe_optimizer(trainer.optimizer).startswith("adamw")
    assert len(trainer.loggers) == 1  # a progress bar on a terminal, lines else
    with pytest.raises(tx.MeshError, match="Expected `tp` to divide the 8 devices"):
        tx.quickstart.simple_tensor_parallel(make_model(), cross_entropy_loss, tp=3)
