"""`tx.make_train_step`: accumulation, HLO collectives, compilation, freezing, RNG,
and bad input caught before compiling. 8 simulated CPU devices (conftest)."""

import functools
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mlp_case import host, make_batch, make_model

import titanax as tx
from models.mlp import cross_entropy_loss
from titanax._explain import bytes_per_device
from titanax._hlo import collectives
from titanax.train import trainable_mask


def dp_plan(steps=1):
    return tx.Plan(dp=tx.DP("data", accumulate_steps=steps))


def dp2_fsdp4_plan(steps=1):
    return tx.Plan(
        dp=tx.DP("data", accumulate_steps=steps), fsdp=tx.FSDP("fsdp", min_size=0)
    )


LAYOUTS = {
    "dp8": (dict(data=8), dp_plan, {}),
    "dp8_spmd": (dict(data=8), dp_plan, {"mode": "spmd"}),
    "dp2_fsdp4": (dict(data=2, fsdp=4), dp2_fsdp4_plan, {}),
}


def build(layout, steps=1, optimizer=None, loss=cross_entropy_loss, **kwargs):
    axes, plan, mode = LAYOUTS[layout]
    optimizer = optimizer if optimizer is not None else optax.sgd(0.1)
    return tx.make_train_step(
        loss, optimizer, plan(steps), tx.make_mesh(**axes), **mode, **kwargs
    )


# --- accumulation -----------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accumulation_equals_the_full_batch(layout):
    batches = [make_batch(64, seed) for seed in range(2)]
    results = []
    for steps in (1, 4):
        ts = build(layout, steps)
        state = ts.init(make_model(), 0)
        losses = []
        for batch in batches:
            state, metrics = ts.step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((np.array(losses), host(state.model)))
    (full_loss, full_params), (acc_loss, acc_params) = results
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    pairs = zip(jax.tree.leaves(acc_params), jax.tree.leaves(full_params), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _data_reductions(layout, steps):
    ts = build(layout, steps)
    mesh = ts.mesh
    state = ts.init(make_model(), 0)
    text = ts.lower(state, make_batch(64)).compile().as_text()
    return [
        c
        for c in collectives(text, mesh)
        if c.kind == "all-reduce" and "data" in c.axes
    ]


@pytest.mark.parametrize("steps", [1, 4], ids=["k1", "k4"])
@pytest.mark.parametrize("layout", ["dp8", "dp8_spmd"])
def test_dp_reduces_gradients_once_per_step(layout, steps):
    found = _data_reductions(layout, steps)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(host(make_model())))
    # One (tuple) all-reduce of every gradient, the loss and the metric: not K.
    assert len(found) == 1, found
    assert not found[0].in_loop
    assert found[0].axes == ("data",)
    assert found[0].bytes >= param_bytes


def test_dp2_fsdp4_accumulation_keeps_the_data_reduction_out_of_the_loop():
    once = _data_reductions("dp2_fsdp4", 1)
    four = _data_reductions("dp2_fsdp4", 4)
    assert four and not any(c.in_loop for c in four), four
    assert len(four) <= len(once)


# --- compilation ------------------------------------------------------------------


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


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


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_only_the_first_step_compiles(layout, compiles):
    ts = build(layout, optimizer=optax.adamw(1e-2))
    state = ts.init(make_model(), 0)
    batches = [make_batch(32, seed) for seed in range(5)]
    compiles.clear()
    for i, batch in enumerate(batches):
        state, metrics = ts.step(state, batch)
        if i == 0:
            jax.block_until_ready(metrics)
            assert compiles == ["jit(train_step)"], compiles
    jax.block_until_ready(metrics)
    assert compiles == ["jit(train_step)"], compiles
    assert ts.compile(state, batches[0]).run._cache_size() == 1


# --- freezing ---------------------------------------------------------------------


def _only_w2(path, leaf):
    return "layers[1].weight" in path


@pytest.mark.parametrize(
    "layout,shards", [("dp8", 1), ("dp2_fsdp4", 4)], ids=["dp8", "dp2_fsdp4"]
)
def test_frozen_leaves_stay_bit_identical(layout, shards):
    ts = build(layout, optimizer=optax.adam(1e-2), trainable=_only_w2)
    state = ts.init(make_model(), 0)
    before = host(state.model)
    for seed in range(3):
        state, _ = ts.step(state, make_batch(32, seed))
    after = host(state.model)
    w2 = after.layers[1].weight
    assert not np.array_equal(w2, before.layers[1].weight)  # it trains
    for old, new in [
        (before.layers[0].weight, after.layers[0].weight),
        (before.layers[0].bias, after.layers[0].bias),
        (before.layers[1].bias, after.layers[1].bias),
    ]:
        assert np.array_equal(old, new)
    # Adam: mu and nu of the trainable leaf only, plus the int32 step count.
    expected = 2 * w2.nbytes // shards + 4
    assert bytes_per_device(state.opt_state) == expected


def test_trainable_filter_spec_equals_the_callable():
    model = make_model()
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.layers[1].weight, spec, True)
    masks = []
    for trainable in (spec, _only_w2):
        ts = build("dp8", trainable=trainable)
        state = ts.init(model, 0)
        masks.append(ts.compile(state, make_batch(32)).mask)
    assert masks[0] == masks[1] == (False, False, True, False)


def test_trainable_mask_with_none_fields():
    # `eqx.nn.Linear(use_bias=False)` has a None field: the mask still lines up
    # with the model's leaves.
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 4, use_bias=False, key=jax.random.key(0)),
            eqx.nn.Linear(4, 2, key=jax.random.key(1)),
        ]
    )
    mask = trainable_mask(model, lambda path, leaf: "layers[1]" in path)
    assert mask == (False, True, True)
    assert trainable_mask(model, None) == (True, True, True)


def test_empty_trainable_set_is_an_error(compiles):
    ts = build("dp8", trainable=lambda path, leaf: False)
    with pytest.raises(tx.TrainerError, match="select at least one array"):
        ts.init(make_model(), 0)
    assert "jit(train_step)" not in compiles


# --- bad input, caught before compiling ---------------------------------------------


def test_batch_not_divisible_by_the_data_shards(compiles):
    ts = build("dp8")
    state = ts.init(make_model(), 0)
    with pytest.raises(tx.BatchError, match="divisible by 8 .*got 12 rows"):
        ts.step(state, make_batch(12))
    assert "jit(train_step)" not in compiles


def test_batch_not_divisible_into_microbatches(compiles):
    ts = build("dp8", steps=4)
    state = ts.init(make_model(), 0)
    with pytest.raises(tx.BatchError, match="divisible by 32 .*4 microbatches"):
        ts.step(state, make_batch(16))
    assert "jit(train_step)" not in compiles


def test_non_scalar_loss(compiles):
    def per_example(model, batch, key):
        return jnp.sum((model(batch["x"]) - 1.0) ** 2, axis=-1)

    ts = build("dp8", loss=per_example)
    state = ts.init(make_model(), 0)
    with pytest.raises(tx.TrainerError, match=r"scalar loss.*shape \(32,\)"):
        ts.step(state, make_batch(32))
    assert "jit(train_step)" not in compiles


def test_non_scalar_metric(compiles):
    def loss(model, batch, key):
        logits = model(batch["x"])
        return jnp.mean(logits**2), {"logits": logits}

    ts = build("dp8", loss=loss)
    state = ts.init(make_model(), 0)
    with pytest.raises(tx.TrainerError, match="metrics to be scalars, got `logits`"):
        ts.step(state, make_batch(32))
    assert "jit(train_step)" not in compiles


def test_batch_structure_changes_between_steps():
    ts = build("dp8")
    state = ts.init(make_model(), 0)
    state, _ = ts.step(state, make_batch(32))
    b = make_batch(32, 1)
    changes = {
        "new key": ({**b, "extra": b["y"]}, "structure"),
        "missing key": ({"x": b["x"]}, "structure"),
        "tuple": ((b["x"], b["y"]), "structure"),
        "new shape": ({"x": b["x"][:16], "y": b["y"][:16]}, r"got \(16, 16\)"),
        "new dtype": ({"x": b["x"].astype(np.float64), "y": b["y"]}, "float64"),
    }
    program = ts.compile(state, b)
    for name, (batch, match) in changes.items():
        with pytest.raises(tx.BatchError, match=match):
            program.step(state, batch)
        assert program.run._cache_size() == 1, name
    state, _ = ts.step(state, b)  # the step still works, and did not recompile
    assert program.run._cache_size() == 1 and int(state.step) == 2


def test_spmd_mode_refuses_sharded_parameters():
    with pytest.raises(tx.ArgumentError, match='DP-only plan with mode="spmd"'):
        build("dp2_fsdp4", mode="spmd")
    with pytest.raises(tx.ArgumentError, match=r"`make_train_step\(mode=...\)`"):
        build("dp8", mode="pmap")


def test_plan_axis_missing_from_the_mesh():
    with pytest.raises(tx.PlanError, match="`data`"):
        tx.make_train_step(
            cross_entropy_loss, optax.sgd(0.1), dp_plan(), tx.make_mesh(batch=8)
        )


@pytest.mark.parametrize(
    "optimizer", ["adam", optax.adam, None], ids=["str", "factory", "none"]
)
def test_bad_optimizer(optimizer):
    with pytest.raises(tx.ArgumentError, match="GradientTransformation"):
        tx.make_train_step(
            cross_entropy_loss, optimizer, dp_plan(), tx.make_mesh(data=8)
        )


def test_loss_not_callable():
    with pytest.raises(tx.ArgumentError, match=r"loss=...\)` expected a function"):
        tx.make_train_step("xent", optax.sgd(0.1), dp_plan(), tx.make_mesh(data=8))


# --- batch placement --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dp8", "dp2_fsdp4"])
def test_put_batch_splits_rows_over_the_data_axes(layout):
    ts = build(layout)
    batch = make_batch(32)
    placed = jax.tree.leaves(tx.put_batch(batch, ts.plan, ts.mesh))
    for got, want in zip(placed, jax.tree.leaves(batch), strict=True):
        assert len(got.addressable_shards) == 8
        for shard in got.addressable_shards:
            assert shard.data.shape[0] == 4  # 32 rows over 8 data shards
            np.testing.assert_array_equal(shard.data, want[shard.index])


def test_put_batch_copies_the_host_batch():
    # A loader may refill its numpy buffers as soon as `next()` returns; a placed
    # (prefetched) batch must not change with them. On one CPU device,
    # `jax.device_put` would alias the numpy buffer.
    ts = tx.make_train_step(
        cross_entropy_loss,
        optax.sgd(0.1),
        dp_plan(),
        tx.make_mesh(jax.devices()[:1], data=1),
    )
    batch = make_batch(32)
    expected = batch["x"].copy()
    placed = ts.compile(ts.init(make_model(), 0), batch).place(batch)
    batch["x"][:] = np.nan
    np.testing.assert_array_equal(np.asarray(placed[0]), expected)


# --- per-device RNG -----------------------------------------------------------------

ROWS, FEATURES = 64, 32


class Rows(eqx.Module):
    """One parameter row per batch row: its gradient shows each row's dropout mask."""

    m: jax.Array


def dropout_loss(model, batch, key):
    # batch["e"] is one-hot rows: e @ m picks this (micro)batch's rows of m.
    mask = jax.random.bernoulli(key, 0.5, (batch["e"].shape[0], FEATURES))
    return jnp.sum((batch["e"] @ model.m) * mask)


def dropout_masks(seed, accumulate=1, n=1):
    """The masks of the first `n` steps, read back from SGD's updates."""
    ts = tx.make_train_step(
        dropout_loss, optax.sgd(1.0), dp_plan(accumulate), tx.make_mesh(data=8)
    )
    state = ts.init(Rows(jnp.zeros((ROWS, FEATURES))), seed)
    key = jax.random.wrap_key_data(np.asarray(state.rng))  # the step donates it
    batch = {"e": np.eye(ROWS, dtype=np.float32)}
    masks, previous = [], np.zeros((ROWS, FEATURES))
    for _ in range(n):
        state, _ = ts.step(state, batch)
        m = np.asarray(state.model.m)
        masks.append(m != previous)
        previous = m
    return masks, key


@functools.cache
def two_steps_of_seed_0():
    return dropout_masks(seed=0, n=2)


def test_dropout_masks_differ_across_data_shards_and_steps():
    (first, second), _ = two_steps_of_seed_0()
    assert 0.35 < first.mean() < 0.65
    shards = first.reshape(8, ROWS // 8, FEATURES)
    assert all(not np.array_equal(shards[0], shards[i]) for i in range(1, 8))
    assert not np.array_equal(first, second)


def test_dropout_masks_repeat_for_the_same_seed():
    (a, _), _ = two_steps_of_seed_0()
    (b,), _ = dropout_masks(seed=0)
    (c,), _ = dropout_masks(seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dropout_masks_equal_the_single_device_computation():
    (mask, _), key = two_steps_of_seed_0()
    one = jax.device_put(jax.random.fold_in(key, 0), jax.devices()[0])
    expected = jax.random.bernoulli(one, 0.5, (ROWS, FEATURES))
    assert np.array_equal(mask, np.asarray(expected))


def test_dropout_masks_differ_across_microbatches():
    (mask,), _ = dropout_masks(seed=0, accumulate=4)
    blocks = mask.reshape(8 * 4, ROWS // 32 * FEATURES)  # (shard, micro) blocks
    assert 0.35 < mask.mean() < 0.65
    assert len({block.tobytes() for block in blocks}) == len(blocks)


# --- the Trainer's packed program -----------------------------------------------------


@pytest.mark.parametrize("layout", ["dp8", "dp2_fsdp4"])
def test_packed_program_steps_like_the_plain_one_with_fewer_buffers(layout):
    ts = build(layout, optimizer=optax.adam(1e-2))
    batches = [make_batch(32, seed) for seed in range(3)]
    plain_state, packed_state = ts.init(make_model(), 0), ts.init(make_model(), 0)
    plain = ts.compile(plain_state, batches[0])
    packed = ts.compile(packed_state, batches[0], packed=True)
    plain_arrays, packed_arrays = (
        plain.flatten(plain_state),
        packed.flatten(packed_state),
    )
    # step, data position, bad steps, first bad step, bad streak and Adam's count:
    # six int32 scalars become one vector (on 8 devices: 40 fewer buffers each way).
    assert len(packed_arrays) == len(plain_arrays) - 5
    counters = packed_arrays[-1]
    assert counters.shape == (6,) and counters.dtype == jnp.int32
    assert counters.sharding.is_fully_replicated
    assert packed.unflatten(packed_arrays).first_bad_step == -1
    for batch in batches:
        plain_arrays, plain_metrics = plain.run(plain_arrays, plain.leaves(batch))
        packed_arrays, vector = packed.run(packed_arrays, packed.leaves(batch))
        # The metrics: one float32 vector, named by the program.
        assert vector.shape == (len(plain_metrics),) and vector.dtype == jnp.float32
        host_metrics = packed.host_metrics(vector)
        assert host_metrics == {k: float(v) for k, v in plain_metrics.items()}
        assert packed.metrics(vector).keys() == plain_metrics.keys()
    want, got = plain.unflatten(plain_arrays), packed.unflatten(packed_arrays)
    assert int(got.step) == 3 and int(got.data_position) == 3 * 32
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    # The counters come back as scalars with the plain program's sharding.
    assert got.step.shape == () and got.step.sharding.is_equivalent_to(
        want.step.sharding, 0
    )


def test_unpacked_metrics_before_any_trace_is_a_typed_error():
    ts = build("dp8")
    state = ts.init(make_model(), 0)
    program = ts.compile(state, make_batch(32, 99), packed=True)
    assert program.run._cache_size() == 0  # a new TrainStep: a new program
    with pytest.raises(tx.TrainerError, match="never traced"):
        program.host_metrics(jnp.zeros(3))
