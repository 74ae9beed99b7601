"""`tx.explain`: one row per parameter, bytes per device, the printed table, the
collectives of a compiled step read from its HLO, and its activations + scratch
bytes per device from XLA's memory analysis (CP=4 against one device)."""

import dataclasses
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float
from test_gpt_parallel import _batch, _random_gpt

import titanax as tx
from models.gpt import GPTConfig, gpt_loss
from titanax._explain import bytes_per_device
from titanax._jobs import explain_config
from titanax.config import load_config


class MLP(eqx.Module):
    w_in: Float[Array, "embed mlp"]
    b_in: Float[Array, "mlp"]
    w_out: Float[Array, "mlp embed"]
    steps: int = eqx.field(static=True, default=0)

    def __call__(self, x):
        return jnp.tanh(x @ self.w_in + self.b_in) @ self.w_out


def _mlp(embed=64, mlp=128):
    rng = np.random.default_rng(0)
    return MLP(
        rng.standard_normal((embed, mlp), np.float32),
        rng.standard_normal((mlp,), np.float32),
        rng.standard_normal((mlp, embed), np.float32),
    )


TOTAL = (64 * 128 * 2 + 128) * 4  # 66_048 bytes


def test_rows():
    mesh = tx.make_mesh(data=2, model=4)
    report = tx.explain(_mlp(), tx.Plan(dp=tx.DP(), tp=tx.TP()), mesh)
    assert [r.path for r in report.params] == ["MLP.w_in", "MLP.b_in", "MLP.w_out"]
    w_in = report.params[0]
    assert w_in.shape == (64, 128)
    assert w_in.dtype == "float32"
    assert w_in.logical == ("embed", "mlp")
    assert w_in.spec == P(None, "model")
    assert w_in.shard_shape == (64, 32)
    assert w_in.bytes_per_device == 64 * 32 * 4
    assert report.param_bytes_total == TOTAL
    assert report.param_bytes_per_device == TOTAL // 4
    assert report.collectives == ()


def test_matches_placed_arrays():
    mesh = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(fsdp=tx.FSDP(min_size=128), tp=tx.TP())
    model = tx.shard(_mlp(), plan, mesh)
    report = tx.explain(model, plan, mesh)
    assert bytes_per_device(model) == report.param_bytes_per_device
    for row, leaf in zip(report.params, jax.tree.leaves(model), strict=True):
        assert {s.data.shape for s in leaf.addressable_shards} == {row.shard_shape}
    # w_in: (64/2, 128/4); b_in: 128 elements, its only dim is TP's; w_out likewise.
    assert report.param_bytes_per_device == (32 * 32 + 32 + 32 * 32) * 4


def test_abstract_model_gives_same_report():
    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(fsdp=tx.FSDP(min_size=1))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x,
        _mlp(),
    )
    assert (
        tx.explain(abstract, plan, mesh).params == tx.explain(_mlp(), plan, mesh).params
    )


def test_printed_table():
    mesh = tx.make_mesh(data=2, model=4)
    report = tx.explain(
        _mlp(),
        tx.Plan(dp=tx.DP(), tp=tx.TP()),
        mesh,
        extra_bytes_per_device={"optimizer state": 2 * TOTAL // 4},
    )
    text = str(report)
    lines = text.splitlines()
    assert (
        lines[0] == "Plan: DP over `data` | TP over `model` (mlp→model, heads→model, "
        "vocab→model)"
    )
    assert lines[1] == "Mesh: data=2 x model=4"
    header = lines[3].split()
    assert header[:2] == ["path", "shape"]
    row = next(line for line in lines if line.startswith("MLP.w_in"))
    assert "(64, 128)" in row
    assert "(embed, mlp)" in row
    assert "(None, 'model')" in row
    assert row.endswith("8.00 KiB")  # 64 x 32 x 4 bytes
    assert "params per device: 16.12 KiB of 64.50 KiB (25.0%)" in text
    assert "optimizer state per device: 32.25 KiB" in text


def test_dp_step_collectives_from_hlo():
    """A DP gradient step all-reduces every gradient over `data`: its bytes add up to
    the parameter bytes."""
    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(dp=tx.DP())
    model = tx.shard(_mlp(), plan, mesh)
    params, static = eqx.partition(model, eqx.is_array)
    batch = jax.device_put(jnp.ones((16, 64)), NamedSharding(mesh, plan.batch_spec(2)))

    def grads(params, x):
        def loss(p):
            return jnp.mean(eqx.combine(p, static)(x) ** 2)

        return jax.grad(loss)(params)

    shardings = tx.shardings(model, plan, mesh)
    step = jax.jit(grads, out_shardings=shardings)
    hlo = step.lower(params, batch).compile().as_text()
    report = tx.explain(model, plan, mesh, hlo_text=hlo)
    assert report.collectives, "a DP step communicates"
    assert {(c.kind, c.axes, c.in_loop) for c in report.collectives} == {
        ("all-reduce", ("data",), False)
    }
    assert sum(c.bytes for c in report.collectives) == TOTAL
    summary = report.collective_summary()
    assert list(summary) == [("all-reduce", ("data",), False)]
    count, nbytes = summary[("all-reduce", ("data",), False)]
    assert count == len(report.collectives) and nbytes == TOTAL
    text = str(report)
    assert "collectives per step" in text
    assert "all-reduce" in text and "over data" in text


@pytest.mark.parametrize(
    "name, sizes, plan, per_device",
    [
        pytest.param("dp8", {"data": 8}, tx.Plan(dp=tx.DP()), TOTAL, id="dp8"),
        pytest.param(
            "fsdp8",
            {"data": 8},
            tx.Plan(fsdp=tx.FSDP(min_size=1)),
            TOTAL // 8,
            id="fsdp8",
        ),
        pytest.param(
            "dp2_tp4",
            {"data": 2, "model": 4},
            tx.Plan(dp=tx.DP(), tp=tx.TP()),
            TOTAL // 4,
            id="dp2_tp4",
        ),
        pytest.param(
            "fsdp2_tp4",
            {"data": 2, "model": 4},
            tx.Plan(fsdp=tx.FSDP(min_size=1), tp=tx.TP()),
            (32 * 32 + 32 + 32 * 32) * 4,
            id="fsdp2_tp4",
        ),
    ],
)
def test_param_bytes_per_device(name, sizes, plan, per_device):
    report = tx.explain(_mlp(), plan, tx.make_mesh(**sizes))
    assert report.param_bytes_per_device == per_device, name


# ------------------------------------------------------------------ None fields


class WithNone(eqx.Module):
    """`None` where arrays could be: a bias-free Linear and an unset optional field."""

    proj: eqx.nn.Linear  # (out=128, in=64), bias None
    w: Float[Array, "embed mlp"]  # (64, 128)
    b: Float[Array, "mlp"] | None


def _with_none(key):
    return WithNone(
        eqx.nn.Linear(64, 128, use_bias=False, key=key),
        jnp.ones((64, 128)),
        None,
    )


def _numpy_model(make):
    """`make(key)` with numpy weights: one trace, no eager op-by-op init (slow)."""
    abstract = eqx.filter_eval_shape(make, jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda x: (
            rng.standard_normal(x.shape).astype(x.dtype)
            if isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        abstract,
    )


def test_model_with_none_fields():
    mesh = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(dp=tx.DP(), tp=tx.TP(rules={"mlp": "model", "out": "model"}))
    model = _numpy_model(_with_none)
    report = tx.explain(model, plan, mesh)
    assert [r.path for r in report.params] == ["WithNone.proj.weight", "WithNone.w"]
    proj, w = report.params
    assert proj.logical == ("out", "in") and proj.spec == P("model", None)
    assert proj.shard_shape == (32, 64) and proj.bytes_per_device == 32 * 64 * 4
    assert w.spec == P(None, "model") and w.shard_shape == (64, 32)
    assert report.param_bytes_total == 2 * 64 * 128 * 4
    assert report.param_bytes_per_device == 2 * 64 * 128 * 4 // 4
    # The report agrees with the placed arrays, and the table has its two rows.
    assert bytes_per_device(tx.shard(model, plan, mesh)) == 2 * 64 * 32 * 4
    rows = [line for line in str(report).splitlines() if line.startswith("WithNone")]
    assert len(rows) == 2
    # tx.init builds the model sharded, `None`s kept, values as unsharded.
    built = tx.init(_with_none, jax.random.key(0), plan, mesh)
    assert built.proj.bias is None and built.b is None
    assert built.proj.weight.sharding.spec == P("model", None)
    reference = eqx.filter_jit(_with_none)(jax.random.key(0))
    np.testing.assert_array_equal(
        np.asarray(built.proj.weight), np.asarray(reference.proj.weight)
    )


# ------------------------------------------------------------------ foreign models


def _stateful(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(3, 8, 3, key=k1),
            eqx.nn.BatchNorm(8, "batch", mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(8, 16, use_bias=False, key=k2),
            eqx.nn.Dropout(0.1),
        ]
    )


# id: (make, plan, mesh sizes, array paths in leaf order)
FOREIGN = {
    "eqx-mlp-fsdp8": (
        lambda k: eqx.nn.MLP(8, 8, 64, 2, key=k),
        tx.Plan(fsdp=tx.FSDP(min_size=1)),
        {"data": 8},
        [f"MLP.layers[{i}].{p}" for i in range(3) for p in ("weight", "bias")],
    ),
    "attention-no-bias-tp4": (
        lambda k: eqx.nn.MultiheadAttention(4, 32, key=k),
        tx.Plan(dp=tx.DP(), tp=tx.TP()),
        {"data": 2, "model": 4},
        [
            f"MultiheadAttention.{p}_proj.weight"
            for p in ("query", "key", "value", "output")
        ],
    ),
    "conv-batchnorm-lambda-dropout-fsdp8": (
        _stateful,
        tx.Plan(fsdp=tx.FSDP(min_size=1)),
        {"data": 8},
        [
            "Sequential.layers[0].weight",
            "Sequential.layers[0].bias",
            "Sequential.layers[1].weight",
            "Sequential.layers[1].bias",
            # BatchNorm's state lives in the model as `StateIndex` initial values.
            "Sequential.layers[1].batch_counter.init",
            "Sequential.layers[1].batch_state_index.init[0]",
            "Sequential.layers[1].batch_state_index.init[1]",
            "Sequential.layers[3].weight",
        ],
    ),
    "gru-no-bias-dp8": (
        lambda k: eqx.nn.GRUCell(8, 16, use_bias=False, key=k),
        tx.Plan(dp=tx.DP()),
        {"data": 8},
        ["GRUCell.weight_ih", "GRUCell.weight_hh"],
    ),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_models(name):
    """Rows, totals and per-device bytes for `eqx.nn` models as they come: `None`
    biases, functions and `StateIndex` inside; checked against the placed arrays."""
    make, plan, sizes, paths = FOREIGN[name]
    mesh = tx.make_mesh(**sizes)
    model = _numpy_model(make)
    report = tx.explain(model, plan, mesh)
    total = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(model) if eqx.is_array(x)
    )
    assert report.param_bytes_total == total
    assert [r.path for r in report.params] == paths  # a row per array
    placed = tx.shard(model, plan, mesh)
    assert report.param_bytes_per_device == bytes_per_device(placed)
    assert report.param_bytes_per_device < total or plan.fsdp is None
    abstract = eqx.filter_eval_shape(make, jax.random.key(0))
    assert tx.explain(abstract, plan, mesh).params == report.params


def test_init_stateful_foreign_model_equals_unsharded():
    """`eqx.nn.BatchNorm`'s `StateIndex` differs between two traces; `tx.init` still
    builds the model, each array equal to an unsharded build."""

    def make(key):
        return eqx.nn.Sequential(
            [eqx.nn.Linear(8, 16, key=key), eqx.nn.BatchNorm(16, "batch", mode="batch")]
        )

    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(fsdp=tx.FSDP(min_size=1))
    key = jax.random.key(0)
    model = tx.init(make, key, plan, mesh)
    assert model.layers[0].weight.sharding.spec == P("data", None)  # out=16 over 8
    assert model.layers[1].weight.sharding.spec == P("data")
    reference = eqx.filter_jit(make)(key)
    got = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    want = jax.tree.leaves(eqx.filter(reference, eqx.is_array))
    assert len(got) == len(want) == 7  # Linear 2, BatchNorm 2 + 3 state arrays
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ step memory
# The compiled step's activations + scratch: XLA's temporary buffers, as
# `compiled.memory_analysis().temp_size_in_bytes` reports them per device.

ACTIVATIONS = "activations + scratch (compiled temp) per device: "


def _mse(model, batch, key=None):
    del key
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def _kib(n):
    """`n` bytes as the report writes a size between 1 KiB and 1 MiB."""
    assert 1024 <= n < 1024**2, n
    return f"{n / 1024:.2f} KiB"


def test_trainer_explain_reports_the_compiled_temp_bytes():
    mesh = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(dp=tx.DP(), tp=tx.TP())
    trainer = tx.Trainer(
        _mlp(), plan, optimizer=optax.adamw(1e-3), loss=_mse, mesh=mesh
    )
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.standard_normal((32, 64)).astype(np.float32),
        "y": rng.standard_normal((32, 64)).astype(np.float32),
    }
    report = trainer.explain(batch)

    # The same step, compiled again here: XLA's own numbers.
    state = trainer.init_state()
    memory = trainer.train_step.lower(state, batch).compile().memory_analysis()
    assert report.step_memory_unavailable is None
    activations = report.activation_bytes_per_device
    assert activations == memory.temp_size_in_bytes
    assert report.step_memory is not None
    assert report.step_memory.argument == memory.argument_size_in_bytes
    assert report.step_memory.output == memory.output_size_in_bytes
    # Each device keeps its (16 rows, 32 of 128 hidden units) fp32 activation.
    assert activations is not None and activations >= 16 * 32 * 4
    assert ACTIVATIONS + _kib(memory.temp_size_in_bytes) in str(report).splitlines()
    # The collectives still come from the same compiled step.
    assert report.collectives


class _NoMemoryAnalysis:
    """A compiled step whose backend has no memory analysis."""

    def __init__(self, result):
        self.result = result

    def memory_analysis(self):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def as_text(self):
        return ""


@pytest.mark.parametrize(
    "result, reason",
    [
        (None, "`memory_analysis()` returned None on the cpu backend"),
        (
            NotImplementedError("not supported by this plugin\nmore"),
            "`memory_analysis()` raised NotImplementedError: not supported by this "
            "plugin on the cpu backend",
        ),
    ],
    ids=["none", "raises"],
)
def test_no_memory_analysis_says_unavailable(result, reason):
    mesh = tx.make_mesh(data=8)
    compiled = _NoMemoryAnalysis(result)
    report = tx.explain(_mlp(), tx.Plan(dp=tx.DP()), mesh, compiled=compiled)
    assert report.step_memory is None
    assert report.activation_bytes_per_device is None
    assert report.step_memory_unavailable == reason
    line = next(x for x in str(report).splitlines() if x.startswith(ACTIVATIONS))
    assert line == f"{ACTIVATIONS}unavailable ({reason})"


def test_no_compiled_step_no_memory_line():
    report = tx.explain(_mlp(), tx.Plan(dp=tx.DP()), tx.make_mesh(data=8))
    assert report.step_memory is None and report.step_memory_unavailable is None
    assert "activations" not in str(report)


# T = 256, one row, eight heads: at CP=1 the (heads, T, T) attention scores dominate
# the step's temporaries; ring attention at CP=4 keeps one (2T/4, T/4) block per
# head. FAST: XLA's LLVM level changes the generated code, not the buffers.
CP_T = 256
FAST = {"xla_backend_optimization_level": 0}


def _gpt_step_report(cp):
    config = GPTConfig.preset(
        "tiny",
        n_layer=2,
        n_head=8,
        n_embd=64,
        vocab_size=64,
        block_size=CP_T,
        unroll=False,
    )
    if cp == 1:
        plan, mesh = tx.Plan(), tx.make_mesh(jax.devices()[:1], data=1)
    else:
        plan = tx.Plan(cp=tx.CP("context"))
        mesh = tx.make_mesh(jax.devices()[:cp], context=cp)
        config = dataclasses.replace(config, layout=tx.Activations(plan, mesh))
    step = tx.make_train_step(gpt_loss, optax.adamw(1e-3), plan, mesh)
    state = step.init(_random_gpt(config), 0)
    compiled = step.lower(state, _batch(config, 1)).compile(FAST)
    report = tx.explain(state.model, plan, mesh, compiled=compiled)
    assert report.activation_bytes_per_device == (
        compiled.memory_analysis().temp_size_in_bytes
    )
    return report


def test_cp4_activation_bytes_at_most_0_3_of_one_device():
    one, four = _gpt_step_report(1), _gpt_step_report(4)
    a1, a4 = one.activation_bytes_per_device, four.activation_bytes_per_device
    assert a1 is not None and a4 is not None
    print(f"activations + scratch per device: CP=1 {a1}, CP=4 {a4}, {a4 / a1:.3f}x")
    assert a4 <= 0.3 * a1, (a4, a1)
    # Parameters are replicated over `context`: CP divides activations, not params.
    assert four.param_bytes_per_device == one.param_bytes_per_device


MNIST_DP = str(Path(__file__).resolve().parents[1] / "examples/configs/mnist_dp.yaml")


def test_titanax_explain_prints_activations(monkeypatch):
    """`titanax explain` (the CLI's `explain_config`) prints the activations line
    from the step it compiles; without a memory analysis it says so, and does not
    claim the step fits."""
    config = load_config(MNIST_DP)
    text, report = explain_config(config, device_memory=10**9)
    temp = report["memory"]["temporaries"]
    assert temp > 0
    assert ACTIVATIONS + _kib(temp) in text.splitlines()
    assert re.search(rf"^  temporaries: +{re.escape(_kib(temp))}$", text, re.M)

    monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", lambda self: None)
    text, report = explain_config(config, device_memory=10**9)
    reason = "`memory_analysis()` returned None on the cpu backend"
    assert f"{ACTIVATIONS}unavailable ({reason})" in text.splitlines()
    assert f"  memory unavailable ({reason})" in text.splitlines()
    assert report["memory"] is None and report["fits"] is None
    assert "Device memory: unknown whether the step fits" in text
