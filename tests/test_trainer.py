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
    # A reduction per leaf, replicated (dp8) or sharded (FSDP) gradients alike: it
    # must give the true global norm.
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
    state = t.fit([batch])
    np.testing.assert_allclose(norms, [expected], rtol=1e-5)
    # No concatenation of the gradients: XLA:CPU copies them into a new buffer
    # element by element (longer than the rest of the step on wide layers), and
    # under FSDP it would gather them.
    hlo = t.train_step.lower(state, batch).compile().as_text()
    concats = [x for x in hlo.splitlines() if " concatenate(" in x and "f32[" in x]
    assert concats == []  # (the loss's own s32 index concatenations stay)


def test_skip_guards_the_update_without_copying_the_state():
    # on_nonfinite="skip" runs the update under `lax.cond`. A select of new against
    # old values copied the donated parameters and moments: here 10 copies and 47%
    # more scratch memory; on a 6.3M-parameter MLP 14 copies, 64 instead of 24 MiB.
    batch = make_batches(1)[0]
    copies, temp = {}, {}
    for mode in ("raise", "skip"):
        t = trainer(on_nonfinite=mode, optimizer=optax.adam(1e-3))
        compiled = t.train_step.lower(t.init_state(), batch).compile()
        entry = compiled.as_text().split("\nENTRY")[1]
        copies[mode] = entry.count(" copy(")
        temp[mode] = compiled.memory_analysis().temp_size_in_bytes
    assert copies["skip"] == copies["raise"]
    assert temp["skip"] <= temp["raise"] + 1024


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


def test_fit_compiles_only_the_first_step():
    t = trainer(optimizer=optax.adamw(1e-2), log_every=2)
    t.init_state()
    compiled = compiled_programs(lambda: t.fit(make_batches(5)))
    # The step compiles once; besides it only the two small programs that pack the
    # counters into one vector and unpack them (once per mesh).
    assert compiled.count("jit(train_step)") == 1, compiled
    assert set(compiled) <= {"jit(train_step)", "jit(stack)", "jit(unstack)"}, compiled
    # A second fit compiles nothing.
    assert compiled_programs(lambda: t.fit(make_batches(3))) == []


# --- bad input ----------------------------------------------------------------------


def train_step_compiles(fn):
    """Run `fn()`; how many times the training step compiled meanwhile (a list of
    its name, once per compile)."""
    return [n for n in compiled_programs(fn) if n == "jit(train_step)"]


def compiled_programs(fn):
    """Run `fn()`; the names of the programs JAX compiled meanwhile."""
    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                names.append(record.getMessage().split()[1])

    handler = Handler(logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        fn()
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(handler)
    return names


def test_batch_not_divisible_before_compiling():
    t = trainer()

    def fit():
        with pytest.raises(tx.BatchError, match="divisible by 8 .*got 12 rows"):
            t.fit(make_batches(2, rows=12))

    assert train_step_compiles(fit) == []
    assert int(t.state.step) == 0


def test_non_scalar_loss_before_compiling():
    def loss(model, batch, key):
        return optax.softmax_cross_entropy_with_integer_labels(
            model(batch["x"]), batch["y"]
        )

    t = trainer(loss=loss)

    def fit():
        with pytest.raises(tx.TrainerError, match="scalar loss"):
            t.fit(make_batches(2))

    assert train_step_compiles(fit) == []


def test_bad_batch_mid_run_leaves_the_state_usable():
    batches = make_batches(4)
    batches[2] = {"x": batches[2]["x"]}
    t = trainer()
    with pytest.raises(tx.BatchError, match="structure"):
        t.fit(batches)
    # Raised before the step: the state after step 2 is intact and trains on.
    assert int(t.state.step) == 2 and t.stop_reason == "failed"
    assert all_finite(t.state.model)
    state = t.fit(make_batches(1))
    assert int(state.step) == 3


def test_bad_batch_mid_run_is_skipped_with_continue_on_error():
    batches = make_batches(4)
    batches[2] = {"x": batches[2]["x"]}
    t = trainer(continue_on_error=True)
    with pytest.warns(UserWarning, match="Step 3 failed and its batch was skipped"):
        state = t.fit(batches)
    # The skipped batch counts as consumed (its rows): a resume does not replay it.
    assert int(state.step) == 3 and int(state.data_position) == 4 * 32
    expected = trainer().fit(batches[:2] + batches[3:])
    assert_trees_close(state.model, expected.model, rtol=0, atol=0)


def test_all_failing_batches_end_within_the_bound():
    good = make_batches(1)
    bad = [{"x": b["x"], "y": b["y"].astype(np.int64)} for b in make_batches(50)]
    t = trainer(continue_on_error=True, max_consecutive_failures=5)
    with (
        pytest.warns(UserWarning, match="skipped"),
        pytest.raises(tx.StepFailedError, match="5 consecutive steps failed") as e,
    ):
        t.fit(good + bad, steps=100)
    assert isinstance(e.value.__cause__, tx.BatchError)
    assert "the first, at step 2" in str(e.value)
    assert int(t.state.step) == 1 and int(t.state.data_position) == 6 * 32


def test_ragged_last_batch_is_dropped_and_the_state_stays_usable():
    batches = make_batches(4) + make_batches(1, rows=8)
    t = trainer()
    with pytest.warns(UserWarning, match=r"Dropped a partial batch .*got \(8, 16\)"):
        state = t.fit(batches, epochs=2)
    assert int(state.step) == 8 and int(state.data_position) == 8 * 32
    assert all_finite(state.model) and t.stop_reason == "finished"


def test_ragged_last_batch_without_drop_last_raises_with_the_state_intact():
    batches = make_batches(4) + make_batches(1, rows=8)
    t = trainer()
    with pytest.raises(tx.BatchError, match=r"partial last batch"):
        t.fit(batches, drop_last=False)
    assert int(t.state.step) == 4  # usable: not donated
    assert int(t.fit(make_batches(1)).step) == 5


def test_empty_trainable_set():
    t = trainer(trainable=lambda path, leaf: False)
    with pytest.raises(tx.TrainerError, match="select at least one array"):
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
    with pytest.raises(tx.ArgumentError, match="mesh="):
        tx.Trainer(
            make_model(),
            LAYOUTS["dp2_fsdp4"][1],
            optimizer=optax.sgd(0.1),
            loss=cross_entropy_loss,
        )


@pytest.mark.parametrize("optimizer", ["sgd", optax.sgd], ids=["str", "factory"])
def test_bad_optimizer(optimizer):
    with pytest.raises(tx.ArgumentError, match="GradientTransformation"):
        trainer(optimizer=optimizer)


def test_bad_plan():
    with pytest.raises(tx.PlanError, match="tx.Plan"):
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
    with pytest.raises(tx.NonFiniteError, match="non-finite values at step 3") as e:
        t.fit(poisoned(step=3))
    assert f"state after step {stop}" in str(e.value)
    assert "includes that step's non-finite update" in str(e.value)
    assert t.state is not None and not all_finite(t.state.model)
    assert int(t.state.bad_steps) == stop - 2 and int(t.state.step) == stop


def test_nonfinite_never_reaches_a_checkpoint(tmp_path):
    # Checkpoints every step, logs every 10: the save after the bad step 3 checks
    # the counters first and raises; step 2 stays the latest checkpoint.
    t = trainer(log_every=10, checkpoint=tx.OrbaxCheckpoint(tmp_path, every=1))
    with pytest.raises(tx.NonFiniteError, match="non-finite values at step 3"):
        t.fit(poisoned(step=3))
    t.checkpoint.wait()
    assert t.checkpoint.latest_step() == 2
    restored = t.checkpoint.restore(t.state)
    assert all_finite(restored.model) and int(restored.step) == 2


def test_nonfinite_skip_goes_on():
    batches = poisoned(step=3)
    skipped, hook = [], lambda step, metrics, _: skipped.append(metrics["skipped"])
    t = trainer(on_nonfinite="skip", log_every=2, hooks=[hook])
    with pytest.warns(tx.SkippedStepsWarning, match=r"1 step\(s\) up to step 4"):
        state = t.fit(batches)
    assert skipped == [0.0, 1.0, 1.0]  # the log line counts skipped steps
    assert all_finite(state.model)
    assert int(state.bad_steps) == 1 and int(state.first_bad_step) == 2
    assert int(state.step) == 6
    # The skipped step changed nothing: the same as training without that batch.
    clean = trainer().fit(batches[:2] + batches[3:])
    assert_trees_close(state.model, clean.model, rtol=1e-6, atol=0)


# --- errors in a step, interruption -------------------------------------------------


def test_nonfinite_skip_stops_after_too_many_in_a_row():
    batches = make_batches(12)
    for b in batches[2:]:
        b["x"][0, 0] = np.nan
    t = trainer(on_nonfinite="skip", log_every=1, max_consecutive_skips=3)
    with (
        pytest.warns(tx.SkippedStepsWarning),
        pytest.raises(tx.NonFiniteError, match="4 skipped in a row up to step 6"),
    ):
        t.fit(batches)
    assert all_finite(t.state.model) and int(t.state.step) == 6


def test_a_loss_that_raises_is_a_typed_error_before_compiling():
    def loss(model, batch, key):
        raise ValueError("boom")

    t = trainer(loss=loss)
    with pytest.raises(tx.StepFailedError, match="ValueError: boom") as e:
        t.fit(make_batches(2))
    assert isinstance(e.value.__cause__, ValueError)
    assert int(t.state.step) == 0


def test_data_position_counts_samples_across_fits():
    t = trainer()
    t.fit(make_batches(3))
    state = t.fit(make_batches(2), steps=5)
    assert int(state.step) == 5 and int(state.data_position) == 5 * 32
    t.fit(make_batches(1), steps=6)  # the position keeps its sharding: no recompile
    program = t.train_step.compile(t.state, make_batches(1)[0], packed=True)
    assert program.run._cache_size() == 1


def test_steps_is_a_total():
    t = trainer()
    t.fit(make_batches(3), steps=3)
    with pytest.warns(UserWarning, match="already at step 3; nothing to train"):
        state = t.fit(make_batches(3), steps=3)
    assert int(state.step) == 3
    assert int(t.fit(make_batches(3), steps=5).step) == 5


def test_data_exhausted_before_steps_warns_or_raises():
    t = trainer()
    with pytest.warns(
        tx.DataExhaustedWarning, match="ended after 3 batches, at step 3"
    ):
        state = t.fit(iter(make_batches(3)), steps=10)
    assert int(state.step) == 3 and t.stop_reason == "data_exhausted"
    with pytest.raises(tx.DataExhaustedError, match="at step 5 of `steps=10`"):
        t.fit(iter(make_batches(2)), steps=10, strict=True)
    assert int(t.state.step) == 5


def test_keyboard_interrupt_keeps_the_last_state_and_reraises():
    batches = make_batches(8)

    def data():
        for i, batch in enumerate(batches):
            if i == 4:
                raise KeyboardInterrupt
            yield batch

    losses, hook = recorder()
    t = trainer(log_every=1, hooks=[hook])
    with pytest.raises(KeyboardInterrupt):
        t.fit(data())
    state = t.state
    assert int(state.step) == 4 and t.stop_reason == "interrupted"
    ref_losses, ref_params = reference(optax.sgd(0.1), batches[:4])
    # Step 4 ran; the interrupt came while prefetching batch 5, before its log.
    np.testing.assert_allclose(losses, ref_losses[:3], rtol=1e-5)
    assert_trees_close(state.model, ref_params)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state.model))
    jnp.sum(state.model.layers[0].weight).block_until_ready()


# --- what loggers see -------------------------------------------------------------


class Recorder:
    """A logger with every optional method, keeping what it is given."""

    def __init__(self):
        self.info, self.events, self.lines, self.histograms_seen = None, [], [], []

    def header(self, info):
        self.info = dict(info)

    def event(self, name, seconds):
        self.events.append((name, seconds))

    def log(self, step, metrics):
        self.lines.append((step, dict(metrics)))

    def histograms(self, step, groups):
        self.histograms_seen.append((step, groups))

    def close(self):
        pass


def test_loggers_get_totals_start_up_events_and_the_compile_time_once():
    record = Recorder()
    t = trainer(loggers=[record], log_every=2)
    t.fit(make_batches(4), steps=4)
    assert record.info["total_steps"] == 4 and record.info["start_step"] == 0
    names = [name for name, _ in record.events]
    assert names == ["place model", "compile step"]
    assert all(seconds > 0 for _, seconds in record.events)
    first, second = record.lines[0][1], record.lines[1][1]
    assert first["compile_time_s"] == record.events[1][1]  # reported once
    assert "compile_time_s" not in second
    assert {"step_time_median_s", "step_time_p90_s", "samples_per_s"} <= set(second)
    assert "mfu" not in second  # no known peak on CPU
    t.fit(make_batches(4), steps=8)  # the program is compiled: no compile event
    assert [name for name, _ in record.events].count("compile step") == 1


def test_mfu_uses_the_step_flops_against_the_given_peak():
    record = Recorder()
    t = trainer(loggers=[record], log_every=3, peak_flops_per_device=1e12)
    t.fit(make_batches(6))
    line = record.lines[-1][1]
    flops = next(iter(t._flops.values()))
    # One MLP step on 32 rows: the XLA count over 8 devices, at least the matmuls'
    # 2*32*(16*64 + 64*4) forward, the same again for the weight gradients, and
    # 2*32*64*4 for the hidden layer's input gradient.
    matmuls = 2 * 32 * (16 * 64 + 64 * 4) * 2 + 2 * 32 * 64 * 4
    assert flops >= matmuls
    expected = flops / line["step_time_s"] / (1e12 * 8)
    # `mfu` is over the meter's rolling window; the last interval's rate is close.
    assert line["mfu"] == pytest.approx(expected, rel=0.5)


def test_histograms_are_the_per_layer_norms_of_the_parameters_and_gradients():
    record = Recorder()
    batches = make_batches(4)
    t = trainer(loggers=[record], histograms_every=4)
    state = t.fit(batches)
    ((step, groups),) = record.histograms_seen
    assert step == 4 and set(groups) == {"param_norm", "grad_norm"}
    params = host(state.model)
    want = np.sqrt(np.sum(np.square(params.layers[0].weight)))
    np.testing.assert_allclose(
        groups["param_norm"]["MLP.layers[0].weight"], want, rtol=1e-6
    )
    # The gradients of step 4's batch under the state after step 4.
    p, static = eqx.partition(state.model, eqx.is_array)
    grads = jax.grad(
        lambda p: cross_entropy_loss(eqx.combine(p, static), batches[3])[0]
    )(p)
    want = np.sqrt(np.sum(np.square(np.asarray(grads.layers[1].weight))))
    np.testing.assert_allclose(
        groups["grad_norm"]["MLP.layers[1].weight"], want, rtol=1e-5
    )


def test_a_profile_window_writes_a_trace(tmp_path):
    profile = tx.loggers.Profile(start=2, steps=2, logdir=tmp_path)
    t = trainer(profile=profile)
    t.fit(make_batches(6))
    assert profile.done and profile.trace_files()


def test_default_loggers_print_lines_when_not_on_a_terminal(capsys):
    t = tx.Trainer(
        make_model(),
        tx.Plan(dp=tx.DP()),
        optimizer=optax.sgd(0.1),
        loss=cross_entropy_loss,
        log_every=2,
    )
    t.fit(make_batches(2))
    out = capsys.readouterr().out
    assert "DP over `data`" in out  # the header
    assert "step 2" in out and "loss" in out


def test_explain_works_for_a_model_with_none_fields():
    class NoBias(eqx.Module):
        hidden: eqx.nn.Linear
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.hidden = eqx.nn.Linear(IN, 64, use_bias=False, key=k1)  # bias None
            self.out = eqx.nn.Linear(64, OUT, key=k2)

        def __call__(self, x):
            return jax.vmap(lambda r: self.out(jax.nn.relu(self.hidden(r))))(x)

    def loss(model, batch, key):
        logits = model(batch["x"])
        return jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        )

    t = tx.Trainer(
        NoBias,
        tx.Plan(dp=tx.DP()),
        optimizer=optax.adam(1e-3),
        loss=loss,
        trainable=lambda path, x: "out" in path,
        loggers=[],
    )
    report = t.explain(make_batches(1)[0])
    text = str(report)
    assert "NoBias.hidden.weight" in text and "NoBias.out.bias" in text
    # Only `out` trains: its gradients and Adam moments, replicated over 8 devices.
    out_bytes = (64 * OUT + OUT) * 4
    assert report.extra_bytes_per_device["grads"] == out_bytes
    assert report.extra_bytes_per_device["optimizer state"] == 2 * out_bytes + 4
