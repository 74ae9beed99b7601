"""`tx.Trainer`: parity with a plain single-device JAX loop, errors, non-finite steps,
interruption. 8 simulated CPU devices (conftest)."""

import functools
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mlp_case import IN, OUT, host, make_model

import titanax as tx
from models.mlp import cross_entropy_loss

STEPS = 10


def make_batches(n=STEPS, rows=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(rows, IN)).astype(np.float32),
            "y": rng.integers(0, OUT, size=(rows,)).astype(np.int32),
        }
        for _ in range(n)
    ]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    pairs = zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True)
    for x, y in pairs:
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def reference(optimizer, batches):
    """The plain loop: one device, `jax.jit`, `jax.value_and_grad`, Optax."""
    params, static = eqx.partition(make_model(), eqx.is_array)
    params = jax.device_put(params, jax.devices()[0])
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss(p):
            return cross_entropy_loss(eqx.combine(p, static), batch)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for batch in batches:
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(value)
    return np.array(jax.device_get(losses)), host(params)


LAYOUTS = {
    "dp8": (None, tx.Plan(dp=tx.DP("data"))),  # mesh=None: all devices on `data`
    "dp8_spmd": (None, tx.Plan(dp=tx.DP("data"))),  # and mode="spmd"
    "fsdp8": (dict(data=8), tx.Plan(fsdp=tx.FSDP("data", min_size=0))),
    "dp2_fsdp4": (
        dict(data=2, fsdp=4),
        tx.Plan(dp=tx.DP("data"), fsdp=tx.FSDP("fsdp", min_size=0)),
    ),
}
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}


def trainer(layout="dp8", optimizer=None, **kwargs):
    axes, plan = LAYOUTS[layout]
    kwargs.setdefault("loss", cross_entropy_loss)
    if layout.endswith("_spmd"):
        kwargs["mode"] = "spmd"
    return tx.Trainer(
        make_model(),
        plan,
        optimizer=optimizer if optimizer is not None else optax.sgd(0.1),
        mesh=tx.make_mesh(**axes) if axes else None,
        **kwargs,
    )


def recorder():
    losses = []

    def hook(step, metrics, trainer):
        losses.append(metrics["loss"])

    return losses, hook


# --- parity -----------------------------------------------------------------------


@functools.cache
def reference_run(opt):
    return reference(OPTIMIZERS[opt](), make_batches())


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_a_single_device_loop(layout, opt):
    ref_losses, ref_params = reference_run(opt)
    losses, hook = recorder()
    t = trainer(layout, OPTIMIZERS[opt](), log_every=1, hooks=[hook])
    state = t.fit(make_batches())
    assert int(state.step) == STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(state.model, ref_params)
    if opt == "adamw" and "fsdp" in layout:
        # FSDP shards the parameters, and Adam's moments exactly like them.
        specs = jax.tree.map(lambda x: x.sharding.spec, state.model)
        assert sum(s != jax.sharding.PartitionSpec() for s in jax.tree.leaves(specs))
        adam = state.opt_state[0]
        for moments in (adam.mu, adam.nu):
            assert jax.tree.map(lambda x: x.sharding.spec, moments) == specs


@pytest.mark.parametrize("layout", ["dp8", "fsdp8", "dp2_fsdp4"])
def test_grad_norm_metric_matches_the_single_device_gradients(layout):
    # Replicated gradients (dp8) take the fused norm over their concatenation;
    # sharded ones (FSDP) the per-leaf sums. Both must give the true global norm.
    batch = make_batches(1)[0]
    params, static = eqx.partition(make_model(), eqx.is_array)
    grads = jax.grad(lambda p: cross_entropy_loss(eqx.combine(p, static), batch)[0])(
        params
    )
    expected = float(
        np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(host(grads))))
    )
    norms = []
    t = trainer(
        layout, log_every=1, hooks=[lambda s, m, _: norms.append(m["grad_norm"])]
    )
    t.fit([batch])
    np.testing.assert_allclose(norms, [expected], rtol=1e-5)
    # Concatenating sharded gradients would gather them: FSDP keeps per-leaf sums.
    assert t.train_step._params_replicated == (layout == "dp8")


def test_async_logging_reaches_the_same_state():
    # log_every=5: metrics are fetched twice, the loop never waits in between.
    _, ref_params = reference_run("sgd")
    losses, hook = recorder()
    state = trainer(log_every=5, hooks=[hook]).fit(make_batches())
    assert len(losses) == 2
    assert_trees_close(state.model, ref_params)


def test_steps_and_epochs():
    batches = make_batches(3)
    assert int(trainer().fit(batches, steps=7).step) == 7  # re-iterates the list
    assert int(trainer().fit(batches, epochs=2).step) == 6
    assert int(trainer().fit(iter(batches), epochs=3).step) == 3  # one pass only


def test_evaluate_matches_the_loss_without_an_update():
    batches = make_batches(2)
    t = trainer()
    before = host(t.init_state().model)
    metrics = t.evaluate(batches)
    model = eqx.combine(before, eqx.partition(make_model(), eqx.is_array)[1])
    expected = np.mean([float(cross_entropy_loss(model, b)[0]) for b in batches])
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    assert set(metrics) == {"loss", "accuracy"}
    after = host(t.state.model)
    assert_trees_close(before, after, rtol=0, atol=0)


# --- compilation ------------------------------------------------------------------


def test_fit_compiles_only_the_first_step(caplog):
    t = trainer(optimizer=optax.adamw(1e-2), log_every=2)
    t.init_state()
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            t.fit(make_batches(5))
    finally:
        jax.config.update("jax_log_compiles", previous)
    compiled = [
        r.getMessage().split()[1]
        for r in caplog.records
        if r.getMessage().startswith("Compiling ")
    ]
    assert compiled == ["jit(_train_step)"]


# --- bad input ----------------------------------------------------------------------


def test_batch_not_divisible_before_compiling():
    t = trainer()
    with pytest.raises(tx.TrainerError, match="does not split"):
        t.fit(make_batches(2, rows=12))
    assert t.train_step._jitted is None


def test_non_scalar_loss_before_compiling():
    def loss(model, batch, key):
        return optax.softmax_cross_entropy_with_integer_labels(
            model(batch["x"]), batch["y"]
        )

    t = trainer(loss=loss)
    with pytest.raises(tx.TrainerError, match="scalar loss"):
        t.fit(make_batches(2))
    assert t.train_step._jitted is None


def test_batch_structure_changes_mid_run():
    batches = make_batches(4)
    batches[2] = {"x": batches[2]["x"]}
    for continue_on_error in (False, True):
        t = trainer(continue_on_error=continue_on_error)
        with pytest.raises(tx.TrainerError, match="structure"):
            t.fit(batches)
        assert t.train_step._jitted._cache_size() == 1


def test_batch_shape_changes_mid_run():
    batches = make_batches(3) + make_batches(1, rows=16)
    t = trainer()
    with pytest.raises(tx.TrainerError, match=r"\(16, 16\)"):
        t.fit(batches)


def test_empty_trainable_set():
    t = trainer(trainable=lambda path, leaf: False)
    with pytest.raises(tx.TrainerError, match="trainable set is empty"):
        t.fit(make_batches(1))


def test_plan_axis_missing_from_the_mesh():
    with pytest.raises(tx.PlanError, match="`data`"):
        tx.Trainer(
            make_model(),
            tx.Plan(dp=tx.DP("data")),
            optimizer=optax.sgd(0.1),
            loss=cross_entropy_loss,
            mesh=tx.make_mesh(batch=8),
        )


def test_multi_axis_plan_needs_a_mesh():
    with pytest.raises(tx.TrainerError, match="mesh="):
        tx.Trainer(
            make_model(),
            LAYOUTS["dp2_fsdp4"][1],
            optimizer=optax.sgd(0.1),
            loss=cross_entropy_loss,
        )


@pytest.mark.parametrize("optimizer", ["sgd", optax.sgd], ids=["str", "factory"])
def test_bad_optimizer(optimizer):
    with pytest.raises(tx.TrainerError, match="GradientTransformation"):
        trainer(optimizer=optimizer)


@pytest.mark.parametrize("log_every", [0, -1, 2.5], ids=["zero", "negative", "float"])
def test_bad_log_every(log_every):
    with pytest.raises(tx.TrainerError, match="log_every"):
        trainer(log_every=log_every)


def test_bad_plan():
    with pytest.raises(tx.TrainerError, match="tx.Plan"):
        tx.Trainer(
            make_model(), "dp", optimizer=optax.sgd(0.1), loss=cross_entropy_loss
        )


# --- non-finite steps -----------------------------------------------------------------


def poisoned(step=3, n=6):
    """Batches whose `step`-th (1-based) has a NaN input: NaN loss and gradients."""
    batches = make_batches(n)
    batches[step - 1]["x"][0, 0] = np.nan
    return batches


def all_finite(tree):
    return all(np.isfinite(x).all() for x in jax.tree.leaves(host(tree)))


@pytest.mark.parametrize("log_every,stop", [(1, 3), (10, 6)])
def test_nonfinite_raises_naming_the_step(log_every, stop):
    # Metrics are fetched at log steps only: the error comes at the first log step
    # (or the end) after the bad step, with the state of that moment, which under
    # "raise" holds the bad update (no select on device: the fast path).
    t = trainer(log_every=log_every)
    with pytest.raises(tx.TrainerError, match="not finite at step 3") as e:
        t.fit(poisoned(step=3))
    assert f"state after step {stop}" in str(e.value)
    assert "includes that step's non-finite update" in str(e.value)
    assert t.state is not None and not all_finite(t.state.model)
    assert int(t.state.bad_steps) == stop - 2 and int(t.state.step) == stop


def test_nonfinite_never_reaches_a_checkpoint(tmp_path):
    # Checkpoints every step, logs every 10: the save after the bad step 3 checks
    # the counters first and raises; step 2 stays the latest checkpoint.
    t = trainer(log_every=10, checkpoint=tx.OrbaxCheckpoint(tmp_path, every=1))
    with pytest.raises(tx.TrainerError, match="not finite at step 3"):
        t.fit(poisoned(step=3))
    t.checkpoint.wait()
    assert t.checkpoint.latest_step() == 2
    restored = t.checkpoint.restore(t.state)
    assert all_finite(restored.model) and int(restored.step) == 2


def test_nonfinite_skip_goes_on():
    batches = poisoned(step=3)
    t = trainer(on_nonfinite="skip")
    state = t.fit(batches)
    assert all_finite(state.model)
    assert int(state.bad_steps) == 1 and int(state.first_bad_step) == 2
    assert int(state.step) == 6
    # The skipped step changed nothing: the same as training without that batch.
    clean = trainer().fit(batches[:2] + batches[3:])
    assert_trees_close(state.model, clean.model, rtol=1e-6, atol=0)


# --- errors in a step, interruption -------------------------------------------------


def test_failing_step_names_the_step():
    def loss(model, batch, key):
        raise ValueError("boom")

    t = trainer(loss=loss)
    with pytest.raises(tx.TrainerError, match="Step 1 failed: ValueError: boom") as e:
        t.fit(make_batches(2))
    assert isinstance(e.value.__cause__, ValueError)


def test_continue_on_error_warns_and_goes_on():
    def loss(model, batch, key):
        raise ValueError("boom")

    t = trainer(loss=loss, continue_on_error=True)
    with pytest.warns(UserWarning, match="skipped"):
        state = t.fit(make_batches(2))
    # The skipped batches were consumed: a resumed run must not replay them.
    assert int(state.step) == 0 and int(state.data_position) == 2


def test_data_position_counts_batches_across_fits():
    t = trainer()
    t.fit(make_batches(3))
    state = t.fit(make_batches(2))
    assert int(state.step) == 5 and int(state.data_position) == 5
    t.fit(make_batches(1))  # the position written back keeps its sharding
    assert t.train_step._jitted._cache_size() == 1


def test_keyboard_interrupt_returns_the_last_state():
    batches = make_batches(8)

    def data():
        for i, batch in enumerate(batches):
            if i == 4:
                raise KeyboardInterrupt
            yield batch

    losses, hook = recorder()
    t = trainer(log_every=1, hooks=[hook])
    with pytest.warns(UserWarning, match="interrupted at step 4"):
        state = t.fit(data())
    assert int(state.step) == 4 and t.state is state
    ref_losses, ref_params = reference(optax.sgd(0.1), batches[:4])
    # Step 4 ran; the interrupt came while prefetching batch 5, before its log.
    np.testing.assert_allclose(losses, ref_losses[:3], rtol=1e-5)
    assert_trees_close(state.model, ref_params)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state.model))
    jnp.sum(state.model.layers[0].weight).block_until_ready()
