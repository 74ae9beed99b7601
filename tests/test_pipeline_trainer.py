"""PP inside the Trainer: AdamW steps under GPipe and 1F1B equal the unpipelined run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_pipeline import TOY_STAGE, Toy, _toy_loss

import titanax as tx


def _batches(n_steps, rows=16):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(rows, 4)).astype(np.float32),
            "y": rng.normal(size=(rows, 3)).astype(np.float32),
        }
        for _ in range(n_steps)
    ]


def _train(plan, mesh, stage, batches):
    step = tx.make_train_step(
        lambda m, b, k: _toy_loss(m, b),
        optax.adamw(1e-2),
        plan,
        mesh,
        stage=stage,
    )
    state = step.init(Toy(jax.random.key(3)), 0)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.parametrize(
    "schedule, data",
    [("gpipe", 1), ("1f1b", 1), ("1f1b", 2)],
    ids=["pp4_gpipe", "pp4_1f1b", "dp2_pp4_1f1b"],
)
def test_trainer_adamw_steps_match_unpipelined(schedule, data):
    batches = _batches(4)
    single = tx.make_mesh(jax.devices()[:1], data=1)
    ref_losses, ref_state = _train(tx.Plan(dp=tx.DP()), single, None, batches)

    devices = jax.devices()[: 4 * data]
    mesh = tx.make_mesh(devices, data=data, pipe=4)
    plan = tx.Plan(dp=tx.DP(), pp=tx.PP("pipe", microbatches=8, schedule=schedule))
    losses, state = _train(plan, mesh, TOY_STAGE, batches)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert state.model.layers.w.sharding.spec[0] == "pipe"
    for got, want in zip(
        jax.tree.leaves(state.model), jax.tree.leaves(ref_state.model), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_pp_plan_needs_a_stage_and_no_accumulation():
    mesh = tx.make_mesh(jax.devices()[:4], pipe=4)
    plan = tx.Plan(pp=tx.PP("pipe", microbatches=4))
    loss = lambda m, b, k: jnp.zeros(())  # noqa: E731
    with pytest.raises(tx.PipelineError, match="Expected a `tx.Stage`"):
        tx.make_train_step(loss, optax.sgd(0.1), plan, mesh)
    accumulating = tx.Plan(
        dp=tx.DP(accumulate_steps=2), pp=tx.PP("pipe", microbatches=4)
    )
    mesh2 = tx.make_mesh(jax.devices()[:4], data=1, pipe=4)
    with pytest.raises(tx.PipelineError, match="replace accumulation"):
        tx.make_train_step(loss, optax.sgd(0.1), accumulating, mesh2, stage=TOY_STAGE)


def test_abstract_state_of_a_pipelined_run_matches_init():
    mesh = tx.make_mesh(jax.devices()[:4], pipe=4)
    plan = tx.Plan(pp=tx.PP("pipe", microbatches=4))
    abstract = tx.abstract_state(
        lambda key: Toy(key), plan, mesh, optax.adamw(1e-2), stage=TOY_STAGE
    )
    step = tx.make_train_step(
        lambda m, b, k: _toy_loss(m, b), optax.adamw(1e-2), plan, mesh, stage=TOY_STAGE
    )
    real = step.init(lambda key: Toy(key), 0)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real), strict=True):
        assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)
    assert abstract.model.layers.w.sharding.spec[0] == "pipe"
    # A pipelined step compiles against it: nothing allocated.
    batch = _batches(1)[0]
    memory = step.lower(abstract, batch).compile().memory_analysis()
    assert memory.argument_size_in_bytes > 0
