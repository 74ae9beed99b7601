"""Shardings with numbers: shard shapes and bytes per device for DP, FSDP, TP, FSDP+TP
and PP on 8 simulated CPU devices, read from placed arrays and from `tx.explain`;
`tx.init` equals an unsharded init and compiles to a program with no collective."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import titanax as tx
from titanax._hlo import collectives
from titanax._sharding import _init_program

EMBED, MLP_DIM = 256, 1024


class MLP(eqx.Module):
    w_in: Float[Array, "embed mlp"]  # (256, 1024)
    b_in: Float[Array, "mlp"]  # (1024,)
    w_out: Float[Array, "mlp embed"]  # (1024, 256)
    b_out: Float[Array, "embed"]  # (256,)

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.w_in = jax.random.normal(k1, (EMBED, MLP_DIM))
        self.b_in = jax.random.normal(k2, (MLP_DIM,))
        self.w_out = jax.random.normal(k3, (MLP_DIM, EMBED))
        self.b_out = jax.random.normal(k4, (EMBED,))


TOTAL_BYTES = (2 * EMBED * MLP_DIM + MLP_DIM + EMBED) * 4  # float32: 2_102_272
FULL = {
    "w_in": (EMBED, MLP_DIM),
    "b_in": (MLP_DIM,),
    "w_out": (MLP_DIM, EMBED),
    "b_out": (EMBED,),
}

# name: (mesh sizes, plan, {leaf: (mesh spec, shard shape)})
LAYOUTS = {
    "dp8": (
        {"data": 8},
        tx.Plan(dp=tx.DP()),
        {
            "w_in": (P(None, None), (256, 1024)),
            "b_in": (P(None), (1024,)),
            "w_out": (P(None, None), (1024, 256)),
            "b_out": (P(None), (256,)),
        },
    ),
    "fsdp8": (
        {"data": 8},
        tx.Plan(fsdp=tx.FSDP(min_size=1024)),
        {
            # The largest dim FSDP divides: 1024 (not 256).
            "w_in": (P(None, "data"), (256, 128)),
            "b_in": (P("data"), (128,)),  # 1024 elements >= min_size
            "w_out": (P("data", None), (128, 256)),
            "b_out": (P(None), (256,)),  # 256 elements < min_size: replicated
        },
    ),
    "dp2_tp4": (
        {"data": 2, "model": 4},
        tx.Plan(dp=tx.DP(), tp=tx.TP()),
        {
            "w_in": (P(None, "model"), (256, 256)),
            "b_in": (P("model"), (256,)),
            "w_out": (P("model", None), (256, 256)),
            "b_out": (P(None), (256,)),
        },
    ),
    "fsdp2_tp4": (
        {"data": 2, "model": 4},
        tx.Plan(fsdp=tx.FSDP(min_size=1024), tp=tx.TP()),
        {
            # TP takes `mlp`; FSDP takes the largest remaining dim it divides.
            "w_in": (P("data", "model"), (128, 256)),
            "b_in": (P("model"), (256,)),  # its only dim is TP's
            "w_out": (P("model", "data"), (256, 128)),
            "b_out": (P(None), (256,)),
        },
    ),
}
# Bytes per device, by hand: the sum of the shard sizes times 4.
BYTES_PER_DEVICE = {
    "dp8": TOTAL_BYTES,
    "fsdp8": (256 * 128 + 128 + 128 * 256 + 256) * 4,  # 263_680
    "dp2_tp4": (256 * 256 + 256 + 256 * 256 + 256) * 4,  # 526_336
    "fsdp2_tp4": (128 * 256 + 256 + 256 * 128 + 256) * 4,  # 264_192
}
IDS = list(LAYOUTS)


def _layout(name):
    sizes, plan, expected = LAYOUTS[name]
    return tx.make_mesh(**sizes), plan, expected


def _abstract_mlp(key):
    return eqx.filter_eval_shape(MLP, key)


@pytest.mark.parametrize("name", IDS)
def test_specs_and_shard_shapes(name, getkey):
    mesh, plan, expected = _layout(name)
    shardings = tx.shardings(_abstract_mlp(getkey()), plan, mesh)
    for leaf, (spec, shard_shape) in expected.items():
        sharding = getattr(shardings, leaf)
        assert isinstance(sharding, NamedSharding)
        assert sharding.mesh == mesh
        assert sharding.spec == spec, leaf
        assert sharding.shard_shape(FULL[leaf]) == shard_shape, leaf


@pytest.mark.parametrize("name", IDS)
def test_init_places_shards_and_equals_unsharded_init(name):
    """`tx.init`'s program: no collective in its HLO, the expected shard on every
    device, and exactly the values of an unsharded `MLP(key)`."""
    mesh, plan, expected = _layout(name)
    key = jax.random.key(0)
    # `tx.init` is `program.build(program.jitted(key))`; compile the program once
    # here to read its HLO too.
    program = _init_program(MLP, key, plan, mesh)
    compiled = program.jitted.lower(key).compile()
    assert collectives(compiled.as_text(), mesh) == []
    model = program.build(compiled(key))
    reference = MLP(key)
    for leaf, (spec, shard_shape) in expected.items():
        x = getattr(model, leaf)
        assert x.sharding.spec == spec, leaf
        assert len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            assert shard.data.shape == shard_shape, leaf
        # Exactly the unsharded values (jax_threefry_partitionable is on).
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(getattr(reference, leaf))
        )
    first = jax.devices()[0]
    on_first = sum(
        s.data.nbytes
        for x in jax.tree.leaves(model)
        for s in x.addressable_shards
        if s.device == first
    )
    assert on_first == BYTES_PER_DEVICE[name]


def test_tx_init_public_entry_point():
    mesh, plan, expected = _layout("fsdp2_tp4")
    key = jax.random.key(0)
    model = tx.init(MLP, key, plan, mesh)
    assert isinstance(model, MLP)
    reference = MLP(key)
    for leaf, (spec, shard_shape) in expected.items():
        x = getattr(model, leaf)
        assert x.sharding.spec == spec
        assert {s.data.shape for s in x.addressable_shards} == {shard_shape}
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(getattr(reference, leaf))
        )


@pytest.mark.parametrize("name", IDS)
def test_explain_bytes_per_device(name, getkey):
    mesh, plan, expected = _layout(name)
    report = tx.explain(_abstract_mlp(getkey()), plan, mesh)
    assert report.param_bytes_total == TOTAL_BYTES
    assert report.param_bytes_per_device == BYTES_PER_DEVICE[name]
    rows = {row.path: row for row in report.params}
    for leaf, (spec, shard_shape) in expected.items():
        row = rows[f"MLP.{leaf}"]
        assert row.spec == spec
        assert row.shard_shape == shard_shape
        assert row.bytes_per_device == math.prod(shard_shape) * 4


def test_fully_tp_sharded_params_take_a_quarter(getkey):
    """On data=2 x model=4 each TP-sharded parameter keeps exactly 1/4 per device."""
    mesh, plan, _ = _layout("dp2_tp4")
    report = tx.explain(_abstract_mlp(getkey()), plan, mesh)
    tp_rows = [r for r in report.params if "model" in tuple(r.spec)]
    assert {r.path for r in tp_rows} == {"MLP.w_in", "MLP.b_in", "MLP.w_out"}
    for row in tp_rows:
        assert row.bytes_per_device * 4 == math.prod(row.shape) * 4
    tp_total = sum(math.prod(r.shape) * 4 for r in tp_rows)
    assert sum(r.bytes_per_device for r in tp_rows) == tp_total // 4


def test_shard_places_an_existing_model(getkey):
    mesh, plan, expected = _layout("fsdp2_tp4")
    model = MLP(getkey())
    placed = tx.shard(model, plan, mesh)
    for leaf, (spec, shard_shape) in expected.items():
        x = getattr(placed, leaf)
        assert x.sharding.spec == spec
        assert {s.data.shape for s in x.addressable_shards} == {shard_shape}
        np.testing.assert_array_equal(np.asarray(x), np.asarray(getattr(model, leaf)))


# ------------------------------------------------------------------ FSDP choices


class Shapes(eqx.Module):
    """Arrays with no logical names, to exercise FSDP's own choice of dim."""

    tall: jax.Array  # (64, 16): largest dim 64
    wide: jax.Array  # (16, 64)
    odd: jax.Array  # (12, 6): 8 divides neither dim
    tie: jax.Array  # (32, 32): the first of equal dims
    small: jax.Array  # (8,): under min_size


def _shapes():
    return Shapes(
        tall=np.zeros((64, 16), np.float32),
        wide=np.zeros((16, 64), np.float32),
        odd=np.zeros((12, 6), np.float32),
        tie=np.zeros((32, 32), np.float32),
        small=np.zeros((8,), np.float32),
    )


def test_fsdp_picks_largest_divisible_dim():
    mesh = tx.make_mesh(data=8)
    specs = tx.shardings(_shapes(), tx.Plan(fsdp=tx.FSDP(min_size=16)), mesh)
    assert specs.tall.spec == P("data", None)
    assert specs.wide.spec == P(None, "data")
    assert specs.odd.spec == P(None, None)
    assert specs.tie.spec == P("data", None)
    assert specs.small.spec == P(None)


def test_fsdp_min_size_replicates_small_params():
    mesh = tx.make_mesh(data=8)
    specs = tx.shardings(_shapes(), tx.Plan(fsdp=tx.FSDP(min_size=1024)), mesh)
    assert specs.tall.spec == P("data", None)  # 1024 elements: sharded
    assert specs.tie.spec == P("data", None)
    assert specs.odd.spec == P(None, None)
    specs = tx.shardings(_shapes(), tx.Plan(fsdp=tx.FSDP(min_size=1025)), mesh)
    assert specs.tall.spec == P(None, None)  # 1024 < 1025: replicated
    assert specs.tie.spec == P(None, None)
    specs = tx.shardings(_shapes(), tx.Plan(fsdp=tx.FSDP(min_size=0)), mesh)
    assert specs.small.spec == P("data")


class Block(eqx.Module):
    w: Float[Array, "embed mlp"]
    norm: Float[Array, "embed"]


class Stack(eqx.Module):
    blocks: Block


def _stack(layers=16, embed=8, mlp=32):
    return Stack(
        Block(
            w=np.zeros((layers, embed, mlp), np.float32),
            norm=np.zeros((layers, embed), np.float32),
        )
    )


def test_fsdp_never_shards_the_layers_dim():
    mesh = tx.make_mesh(data=8)
    model = _stack(layers=64, embed=8, mlp=32)
    specs = tx.shardings(model, tx.Plan(fsdp=tx.FSDP(min_size=1)), mesh)
    # `layers` (64) is the largest dim, but FSDP takes `mlp` (32).
    assert specs.blocks.w.spec == P(None, None, "data")
    # The only other dim (8) is divisible: sharded there, not on `layers`.
    assert specs.blocks.norm.spec == P(None, "data")
    model = _stack(layers=64, embed=4, mlp=32)
    specs = tx.shardings(model, tx.Plan(fsdp=tx.FSDP(min_size=1)), mesh)
    assert specs.blocks.norm.spec == P(None, None)  # 4 % 8: stays replicated


def test_pp_splits_layers_over_pipe():
    mesh = tx.make_mesh(pipe=2, data=2, model=2)
    plan = tx.Plan(dp=tx.DP(), tp=tx.TP(), pp=tx.PP(microbatches=4))
    plan.validate(mesh, _stack())
    specs = tx.shardings(_stack(), plan, mesh)
    assert specs.blocks.w.spec == P("pipe", None, "model")
    assert specs.blocks.w.shard_shape((16, 8, 32)) == (8, 8, 16)
    assert specs.blocks.norm.spec == P("pipe", None)
    report = tx.explain(_stack(), plan, mesh)
    total = (16 * 8 * 32 + 16 * 8) * 4
    assert report.param_bytes_total == total
    assert report.param_bytes_per_device == (8 * 8 * 16 + 8 * 8) * 4


def test_pp_fsdp_tp_stacked_init(getkey):
    """All three sharded axes on one stacked weight; init equals unsharded init."""

    def make(key):
        keys = jax.random.split(key, 4)
        return Stack(
            eqx.filter_vmap(
                lambda k: Block(
                    w=jax.random.normal(k, (8, 16)),
                    norm=jnp.ones(8),
                )
            )(keys)
        )

    mesh = tx.make_mesh(pipe=2, data=2, model=2)
    plan = tx.Plan(fsdp=tx.FSDP(min_size=1), tp=tx.TP(), pp=tx.PP(microbatches=2))
    key = getkey()
    model = tx.init(make, key, plan, mesh)
    assert model.blocks.w.sharding.spec == P("pipe", "data", "model")
    assert {s.data.shape for s in model.blocks.w.addressable_shards} == {(2, 4, 8)}
    assert model.blocks.norm.sharding.spec == P("pipe", "data")
    reference = eqx.filter_jit(make)(key)
    np.testing.assert_array_equal(np.asarray(model.blocks.w), reference.blocks.w)
