"""`tx.explain`: one row per parameter, bytes per device, the printed table, and the
collectives of a compiled step read from its HLO."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import titanax as tx
from titanax._explain import bytes_per_device


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
