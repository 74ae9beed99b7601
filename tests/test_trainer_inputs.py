"""Bad input to the training entry points, as users get it wrong: every case is a
typed Titanax error (or, where the input is legal but suspicious, a warning) with a
fix, raised before the step compiles. 8 simulated CPU devices (conftest)."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mlp_case import IN, OUT, make_model

import titanax as tx
from models.mlp import MLP, cross_entropy_loss


def batches(n=2, rows=32):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(rows, IN)).astype(np.float32),
            "y": rng.integers(0, OUT, size=(rows,)).astype(np.int32),
        }
        for _ in range(n)
    ]


PLAN = tx.Plan(dp=tx.DP("data"))


def trainer(**kwargs):
    kwargs.setdefault("optimizer", optax.sgd(0.1))
    kwargs.setdefault("loss", cross_entropy_loss)
    kwargs.setdefault("loggers", [])
    model = kwargs.pop("model", make_model())
    plan = kwargs.pop("plan", PLAN)
    return tx.Trainer(model, plan, **kwargs)


def fit(**kwargs):
    data = kwargs.pop("data", batches())
    return lambda: trainer().fit(data, **kwargs)


def make(**kwargs):
    return lambda: trainer(**kwargs)


def step_of(**kwargs):
    args = dict(
        loss=cross_entropy_loss,
        optimizer=optax.sgd(0.1),
        plan=PLAN,
        mesh=tx.make_mesh(data=8),
    )
    args.update(kwargs)
    return lambda: tx.make_train_step(**args)


class NeedsWidth(eqx.Module):
    w: jax.Array

    def __init__(self, width, key):
        self.w = jax.random.normal(key, (width, width))


def returns_a_dict(key):
    return {"w": jnp.ones((4, 4))}


def per_example_loss(model, batch, key):
    return optax.softmax_cross_entropy_with_integer_labels(
        model(batch["x"]), batch["y"]
    )


def bad_metric_loss(model, batch, key):
    return jnp.mean(model(batch["x"]) ** 2), {"logits": model(batch["x"])}


def string_loss(model, batch, key):
    return "low"


def raising_loss(model, batch, key):
    raise KeyError("label")


def wrong_batch(i, batch):
    data = batches(3)
    data[i] = batch(data[i])
    return data


CASES = {
    # --- fit(steps=, epochs=, resume=, ...) ---------------------------------------
    "steps-negative": (
        fit(steps=-5),
        tx.ArgumentError,
        r"fit\(steps=...\)` .*got int -5",
    ),
    "steps-float": (fit(steps=2.5), tx.ArgumentError, r"expected an int ≥ 1.*2\.5"),
    "steps-zero": (fit(steps=0), tx.ArgumentError, r"got int 0"),
    "steps-bool": (fit(steps=True), tx.ArgumentError, r"got bool True"),
    "steps-string": (fit(steps="10"), tx.ArgumentError, r"got str '10'"),
    "epochs-zero": (fit(epochs=0), tx.ArgumentError, r"fit\(epochs=...\)"),
    "epochs-float": (fit(epochs=1.5), tx.ArgumentError, r"fit\(epochs=...\)"),
    "resume-int": (fit(resume=1), tx.ArgumentError, r"True, False or a checkpoint"),
    "resume-without-checkpoint": (
        fit(resume=True),
        tx.ArgumentError,
        "Expected a checkpoint to resume from",
    ),
    "strict-string": (fit(strict="yes"), tx.ArgumentError, r"fit\(strict=...\)"),
    "drop-last-int": (fit(drop_last=0), tx.ArgumentError, r"fit\(drop_last=...\)"),
    "data-one-batch-dict": (
        fit(data=batches(1)[0]),
        tx.ArgumentError,
        "looks like one batch",
    ),
    "data-array": (fit(data=np.ones((4, 3))), tx.ArgumentError, "looks like one batch"),
    "data-none": (fit(data=None), tx.ArgumentError, "iterable of batches"),
    "data-string": (fit(data="train.bin"), tx.ArgumentError, "iterable of batches"),
    "data-empty": (fit(data=[]), tx.ArgumentError, "at least one batch, got none"),
    # --- batches ------------------------------------------------------------------
    "batch-rows-not-divisible": (
        fit(data=batches(2, rows=12)),
        tx.BatchError,
        "divisible by 8",
    ),
    "batch-scalar-leaf": (
        fit(data=[{"x": np.float32(1.0), "y": np.int32(0)}]),
        tx.BatchError,
        "leading batch dim, got a scalar",
    ),
    "batch-rows-differ-between-leaves": (
        fit(data=[{"x": batches(1)[0]["x"], "y": np.zeros(16, np.int32)}]),
        tx.BatchError,
        "same number of rows",
    ),
    "batch-no-arrays": (fit(data=[{}]), tx.BatchError, "at least one array"),
    "batch-new-key-mid-run": (
        fit(data=wrong_batch(1, lambda b: {**b, "z": b["y"]})),
        tx.BatchError,
        "structure",
    ),
    "batch-new-dtype-mid-run": (
        fit(data=wrong_batch(1, lambda b: {**b, "x": b["x"].astype(np.float64)})),
        tx.BatchError,
        "float64",
    ),
    "batch-wider-mid-run": (
        fit(data=wrong_batch(1, lambda b: {**b, "x": np.ones((32, IN + 1), "f4")})),
        tx.BatchError,
        r"got \(32, 17\)",
    ),
    "batch-accumulation-rows": (
        lambda: trainer(plan=tx.Plan(dp=tx.DP("data", accumulate_steps=3))).fit(
            batches()
        ),
        tx.BatchError,
        "divisible by 24",
    ),
    # --- the loss -----------------------------------------------------------------
    "loss-not-callable": (make(loss="xent"), tx.ArgumentError, "expected a function"),
    "loss-per-example": (
        lambda: trainer(loss=per_example_loss).fit(batches()),
        tx.TrainerError,
        r"scalar loss .*shape \(32,\)",
    ),
    "loss-metric-not-scalar": (
        lambda: trainer(loss=bad_metric_loss).fit(batches()),
        tx.TrainerError,
        "metrics to be scalars, got `logits`",
    ),
    "loss-returns-a-string": (
        lambda: trainer(loss=string_loss).fit(batches()),
        tx.TrainerError,
        "got str",
    ),
    "loss-raises": (
        lambda: trainer(loss=raising_loss).fit(batches()),
        tx.StepFailedError,
        "KeyError",
    ),
    # --- Trainer(...) -------------------------------------------------------------
    "model-class-needing-args": (
        make(model=NeedsWidth),
        tx.ModelError,
        "NeedsWidth",
    ),
    "model-zero-arg-function": (
        make(model=lambda: make_model()),
        tx.ModelError,
        "key",
    ),
    "model-none": (make(model=None), tx.ModelError, "NoneType|None"),
    "model-factory-returns-a-dict": (
        lambda: trainer(model=returns_a_dict).fit(batches()),
        tx.ModelError,
        "eqx.Module",
    ),
    "plan-string": (make(plan="dp"), tx.PlanError, "tx.Plan"),
    "plan-accumulate-bool": (
        lambda: tx.DP(accumulate_steps=True),
        tx.PlanError,
        "got True",
    ),
    "plan-rule-axes-none": (
        lambda: tx.Plan(rules=[("w", None)]),
        tx.PlanError,
        "rules",
    ),
    "plan-axis-missing-from-mesh": (
        make(mesh=tx.make_mesh(batch=8)),
        tx.PlanError,
        "`data`",
    ),
    "mesh-not-a-mesh": (make(mesh={"data": 8}), tx.ArgumentError, "jax.sharding.Mesh"),
    "optimizer-string": (make(optimizer="adam"), tx.ArgumentError, "optax"),
    "optimizer-factory": (make(optimizer=optax.adam), tx.ArgumentError, "optax"),
    "precision-string": (
        make(precision="bf16"),
        tx.ArgumentError,
        r"tx\.Precision\.bf16\(\)",
    ),
    "trainable-string": (make(trainable="head"), tx.ArgumentError, "trainable"),
    "trainable-selects-nothing": (
        lambda: trainer(trainable=lambda path, x: False).fit(batches()),
        tx.TrainerError,
        "select at least one array",
    ),
    "checkpoint-path-string": (
        make(checkpoint="ckpt/"),
        tx.ArgumentError,
        "OrbaxCheckpoint",
    ),
    "loggers-object": (make(loggers=[object()]), tx.ArgumentError, "index 0"),
    "loggers-one-logger": (
        make(loggers=tx.loggers.Basic()),
        tx.ArgumentError,
        "list of loggers",
    ),
    "hooks-int": (make(hooks=[123]), tx.ArgumentError, r"hooks=...\)` .*123"),
    "hooks-function-not-list": (
        make(hooks=print),
        tx.ArgumentError,
        "list of functions",
    ),
    "log-every-bool": (make(log_every=True), tx.ArgumentError, "log_every"),
    "log-every-zero": (make(log_every=0), tx.ArgumentError, "log_every"),
    "log-every-float": (make(log_every=2.5), tx.ArgumentError, "log_every"),
    "seed-string": (make(seed="abc"), tx.ArgumentError, r"seed=...\)"),
    "seed-negative": (make(seed=-1), tx.ArgumentError, r"seed=...\)"),
    "continue-on-error-string": (
        make(continue_on_error="yes"),
        tx.ArgumentError,
        "continue_on_error",
    ),
    "max-failures-zero": (
        make(max_consecutive_failures=0),
        tx.ArgumentError,
        "max_consecutive_failures",
    ),
    "on-nonfinite-typo": (make(on_nonfinite="ignore"), tx.ArgumentError, "'skip'"),
    "max-skips-float": (
        make(max_consecutive_skips=2.0),
        tx.ArgumentError,
        "max_consecutive_skips",
    ),
    "tokens-per-sample-zero": (
        make(tokens_per_sample=0),
        tx.ArgumentError,
        "tokens_per_sample",
    ),
    "flops-negative": (make(flops_per_step=-1.0), tx.ArgumentError, "flops_per_step"),
    "peak-flops-string": (
        make(peak_flops_per_device="989T"),
        tx.ArgumentError,
        "peak_flops_per_device",
    ),
    "histograms-every-zero": (
        make(histograms_every=0),
        tx.ArgumentError,
        "histograms_every",
    ),
    "profile-dict": (make(profile={"start": 3}), tx.ArgumentError, "Profile"),
    "mode-typo": (make(mode="pmap"), tx.ArgumentError, "'jit' or 'spmd'"),
    "spmd-with-fsdp": (
        make(
            plan=tx.Plan(fsdp=tx.FSDP("data")),
            mode="spmd",
        ),
        tx.ArgumentError,
        "DP-only plan",
    ),
    "stage-without-pp": (make(stage="blocks"), tx.PipelineError, "no `stage=`"),
    "multi-axis-plan-without-mesh": (
        make(plan=tx.Plan(dp=tx.DP("data"), tp=tx.TP("model"))),
        tx.ArgumentError,
        "will not guess",
    ),
    # --- make_train_step(...) ----------------------------------------------------
    "step-donate-string": (step_of(donate="no"), tx.ArgumentError, "donate"),
    "step-mesh-none": (step_of(mesh=None), tx.ArgumentError, "Mesh"),
    "step-state-not-a-trainstate": (
        lambda: step_of()().step({"w": jnp.ones(3)}, batches(1)[0]),
        tx.ArgumentError,
        "TrainState",
    ),
}


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.names.append(record.getMessage().split()[1])


@pytest.fixture
def compiles():
    handler = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        yield handler.names
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(handler)


# Raised at a later batch: the first batch's step compiled, the bad one compiles
# nothing more (and the state stays intact: tests/test_trainer.py).
MID_RUN = {"batch-new-key-mid-run", "batch-new-dtype-mid-run", "batch-wider-mid-run"}


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_typed_error_with_a_fix_before_compiling(case, compiles):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match) as e:
        call()
    assert isinstance(e.value, tx.TitanaxError)
    assert e.value.suggestion, "every error says what to do"
    assert "Fix:" in str(e.value)
    # Raised before the step compiled (a later bad batch compiles nothing more).
    assert compiles.count("jit(train_step)") == (1 if case in MID_RUN else 0)


def test_a_one_shot_iterator_shorter_than_steps_warns_with_the_counts():
    t = trainer()
    with pytest.warns(tx.DataExhaustedWarning, match="ended after 2 batches"):
        t.fit(iter(batches(2)), steps=10)
    assert int(t.state.step) == 2


def test_the_model_factory_form_is_shown():
    with pytest.raises(tx.ModelError, match="key") as e:
        trainer(model=NeedsWidth)
    assert "lambda key" in e.value.suggestion


def test_a_model_factory_works():
    t = trainer(model=lambda key: MLP(IN, OUT, hidden_sizes=(8,), key=key))
    assert int(t.fit(batches(2)).step) == 2
