"""Collectives read from compiled HLO: kinds, mesh axes, bytes per device, loop flags.

Small jitted programs with known communication on a data=2 x model=4 mesh, then the
replica-group forms XLA prints (explicit, iota, mesh with device ids and sub-axes) and
async pairs, as text.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax._hlo import _groups, collectives, count_collectives


@pytest.fixture(scope="module")
def mesh():
    return tx.make_mesh(data=2, model=4)


def _hlo(fn, *args):
    return fn.lower(*args).compile().as_text()


def _spmd(mesh, fn, in_specs, out_specs):
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    )


def _summary(found):
    return [(c.kind, c.axes, c.bytes, c.in_loop) for c in found]


def test_tp_matmul_all_reduces_over_model(mesh):
    """Row-parallel matmul: contraction dim sharded over `model`, output replicated."""
    x = jax.device_put(jnp.ones((8, 256)), NamedSharding(mesh, P(None, "model")))
    w = jax.device_put(jnp.ones((256, 64)), NamedSharding(mesh, P("model", None)))
    f = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P()))
    found = collectives(_hlo(f, x, w), mesh)
    assert _summary(found) == [("all-reduce", ("model",), 8 * 64 * 4, False)]


def test_column_parallel_matmul_needs_no_collective(mesh):
    x = jax.device_put(jnp.ones((8, 256)), NamedSharding(mesh, P("data", None)))
    w = jax.device_put(jnp.ones((256, 64)), NamedSharding(mesh, P(None, "model")))
    f = jax.jit(
        lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P("data", "model"))
    )
    assert collectives(_hlo(f, x, w), mesh) == []


def test_psum_inside_fori_loop_is_in_loop(mesh):
    def body(i, c):
        return c + jax.lax.psum(c, "data")

    f = _spmd(mesh, lambda a: jax.lax.fori_loop(0, 3, body, a), P("data"), P("data"))
    found = collectives(_hlo(f, jnp.ones((8, 16))), mesh)
    # Each device holds (4, 16) float32 = 256 bytes, reduced over `data` per iteration.
    assert _summary(found) == [("all-reduce", ("data",), 256, True)]
    assert found[0].computation != ""


def test_psum_outside_and_inside_loop(mesh):
    def fn(a):
        a = jax.lax.psum(a, "model")
        return jax.lax.fori_loop(0, 2, lambda i, c: jax.lax.psum(c, "data") * 0.5, a)

    f = _spmd(mesh, fn, P("data", "model"), P())
    found = sorted(_summary(collectives(_hlo(f, jnp.ones((8, 16))), mesh)))
    assert found == [
        ("all-reduce", ("data",), 64, True),
        ("all-reduce", ("model",), 64, False),
    ]


@pytest.mark.parametrize(
    "axis, other",
    [
        pytest.param("model", "data", id="model"),
        pytest.param("data", "model", id="data"),
    ],
)
def test_ppermute_is_collective_permute(mesh, axis, other):
    n = mesh.shape[axis]
    perm = [(i, (i + 1) % n) for i in range(n)]
    f = _spmd(
        mesh, lambda a: jax.lax.ppermute(a, axis, perm), P("data", "model"), P(axis)
    )
    found = collectives(_hlo(f, jnp.ones((8, 16))), mesh)
    # (8, 16) over 2 x 4 devices: (4, 4) float32 = 64 bytes each.
    assert _summary(found) == [("collective-permute", (axis,), 64, False)]


def test_all_gather_reduce_scatter_all_to_all(mesh):
    x = jnp.ones((8, 16))
    gather = _spmd(
        mesh,
        lambda a: jax.lax.all_gather(a, "data", tiled=True),
        P("data", "model"),
        P(None, "model"),
    )
    assert _summary(collectives(_hlo(gather, x), mesh)) == [
        ("all-gather", ("data",), 8 * 4 * 4, False)
    ]
    scatter = _spmd(
        mesh,
        lambda a: jax.lax.psum_scatter(a, "model", tiled=True),
        P("data"),
        P("data", "model"),
    )
    assert _summary(collectives(_hlo(scatter, x), mesh)) == [
        ("reduce-scatter", ("model",), 1 * 16 * 4, False)
    ]
    to_all = _spmd(
        mesh,
        lambda a: jax.lax.all_to_all(a, "model", 0, 1, tiled=True),
        P("data", "model"),
        P("data", "model"),
    )
    found = collectives(_hlo(to_all, jnp.ones((8, 64))), mesh)
    assert [(c.kind, c.axes) for c in found] == [("all-to-all", ("model",))]
    assert found[0].bytes == 4 * 16 * 4  # the per-device block, (4, 16) float32


def test_psum_over_both_axes(mesh):
    f = _spmd(
        mesh, lambda a: jax.lax.psum(a, ("data", "model")), P("data", "model"), P()
    )
    found = collectives(_hlo(f, jnp.ones((8, 16))), mesh)
    assert _summary(found) == [("all-reduce", ("data", "model"), 64, False)]


def test_axes_follow_mesh_positions_not_device_ids():
    """Replica ids are positions in the mesh's device order, whatever the ids are."""
    devices = np.array(jax.devices()[::-1]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"))
    f = _spmd(mesh, lambda a: jax.lax.psum(a, "model"), P("data", "model"), P("data"))
    found = collectives(_hlo(f, jnp.ones((8, 16))), mesh)
    assert [(c.kind, c.axes) for c in found] == [("all-reduce", ("model",))]


def test_count_collectives(mesh):
    def fn(a):
        return jax.lax.psum(jax.lax.psum(a, "model") * 2, "data")

    hlo = _hlo(_spmd(mesh, fn, P("data", "model"), P()), jnp.ones((8, 16)))
    assert count_collectives(hlo, mesh) == 2
    assert count_collectives(hlo, mesh, kind="all-reduce", axes=("model",)) == 1
    assert count_collectives(hlo, mesh, kind="all-reduce", axes=("data",)) == 1
    assert count_collectives(hlo, mesh, kind="all-gather") == 0


def test_without_mesh_axes_are_empty(mesh):
    f = _spmd(mesh, lambda a: jax.lax.psum(a, "model"), P("data", "model"), P("data"))
    found = collectives(_hlo(f, jnp.ones((8, 16))))
    assert [(c.kind, c.axes, c.bytes) for c in found] == [("all-reduce", (), 64)]


# ------------------------------------------------------------------ text forms


@pytest.mark.parametrize(
    "attr, groups",
    [
        pytest.param(
            "replica_groups={{0,4},{1,5},{2,6},{3,7}}",
            [[0, 4], [1, 5], [2, 6], [3, 7]],
            id="explicit",
        ),
        pytest.param(
            "replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]], id="iota"
        ),
        pytest.param(
            "replica_groups=[4,2]<=[2,4]T(1,0)",
            [[0, 4], [1, 5], [2, 6], [3, 7]],
            id="iota-transposed",
        ),
        pytest.param(
            "replica_groups=mesh['a'=2,'b'=4] {'b'}",
            [[0, 1, 2, 3], [4, 5, 6, 7]],
            id="mesh",
        ),
        pytest.param(
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], "
            "device_ids=([2,4]T(1,0)) {'axis_1'}",
            [[0, 1, 2, 3], [4, 5, 6, 7]],
            id="mesh-device-ids-iota",
        ),
        pytest.param(
            "replica_groups=mesh['a'=2,'b'=4], device_ids=(0,4,1,5,2,6,3,7) {'a'}",
            [[0, 2], [4, 6], [1, 3], [5, 7]],
            id="mesh-device-ids-list",
        ),
        pytest.param(
            "replica_groups=mesh['x'=8] {'x':(1)2}",
            [[0, 4], [1, 5], [2, 6], [3, 7]],
            id="mesh-sub-axis-major",
        ),
        pytest.param(
            "replica_groups=mesh['x'=8] {'x':(2)4}",
            [[0, 1, 2, 3], [4, 5, 6, 7]],
            id="mesh-sub-axis-minor",
        ),
        pytest.param(
            "source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]], id="permute-pairs"
        ),
        pytest.param(
            "replica_groups={}", [[0, 1, 2, 3, 4, 5, 6, 7]], id="empty-means-all"
        ),
    ],
)
def test_replica_group_forms(attr, groups):
    # A layout such as `{1,0}` on the line must not be read as a group or a pair.
    line = f"%op = f32[4,4]{{1,0}} all-reduce(%p), channel_id=1, {attr}, to_apply=%add"
    assert _groups(line, 8) == groups


_ASYNC = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ars = f32[8]{0} all-reduce-start(%x), replica_groups={{0,4},{1,5},{2,6},{3,7}}, \
to_apply=%add
  %ard = f32[8]{0} all-reduce-done(%ars)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %ags = (f32[4,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%a), \
replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
  %agd = f32[8,16]{1,0} all-gather-done(%ags)
  %combined = (f32[8]{0}, f32[4]{0}) all-reduce-start(%a, %b), \
replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %cd = (f32[8]{0}, f32[4]{0}) all-reduce-done(%combined)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%a), \
source_target_pairs={{0,1},{1,0}}
  %cpd = f32[4]{0} collective-permute-done(%cps)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
}
"""


def test_async_pairs_count_once_with_result_bytes(mesh):
    found = collectives(_ASYNC, mesh)
    assert _summary(found) == [
        ("all-reduce", ("data",), 32, True),  # in the while body
        ("all-gather", ("data",), 8 * 16 * 4, False),  # the result, not the operand
        ("all-reduce", ("model",), (8 + 4) * 4, False),  # every combined result
        ("collective-permute", ("model",), 16, False),  # u32[] contexts left out
    ]
    assert [c.computation for c in found] == ["body", "main", "main", "main"]
