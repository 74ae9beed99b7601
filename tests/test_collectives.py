"""`titanax.parallel.collectives` against numpy references built from the global array.

Every op runs on a 1-D mesh of 8 (`data`) and a 2-D mesh of 2x4 (`data`, `model`),
over each axis and over both. Inputs are PyTrees `{"a": (8, 4), "b": [(16, 2)]}` per
device; the global input stacks them over the mesh: `(*mesh.shape, *local)`. Each
device's result comes back the same way, so `out[coords]` is that device's output.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from titanax._errors import CollectiveError
from titanax._mesh import make_mesh
from titanax.parallel import collectives as C
from titanax.parallel import spmd

MESHES = {
    "8": lambda: make_mesh(data=8),
    "2x4": lambda: make_mesh(data=2, model=4),
}
CASES = [
    ("8", "data"),
    ("2x4", "data"),
    ("2x4", "model"),
    ("2x4", ("data", "model")),
]
CASE_IDS = ["8-data", "2x4-data", "2x4-model", "2x4-both"]


def _mesh(name):
    return MESHES[name]()


def _names(axis):
    return axis if isinstance(axis, tuple) else (axis,)


def per_device(fn, mesh, x):
    """Run `fn` per device on `x[coords]`; return outputs stacked by device coords."""
    k = len(mesh.axis_names)
    spec = P(*mesh.axis_names)

    def body(v):
        v = jax.tree.map(lambda a: a.reshape(a.shape[k:]), v)
        out = fn(v)
        return jax.tree.map(lambda a: jnp.reshape(a, (1,) * k + jnp.shape(a)), out)

    f = jax.jit(spmd(body, None, mesh, in_specs=(spec,), out_specs=spec))
    return jax.tree.map(np.asarray, f(x))


def groups(mesh, axis):
    """{device coords: (index along `axis`, [coords of that axis's devices])}."""
    names = tuple(mesh.axis_names)
    shape = tuple(mesh.shape[n] for n in names)
    dims = [names.index(a) for a in _names(axis)]
    out = {}
    for c in itertools.product(*(range(s) for s in shape)):
        members = []
        for sub in itertools.product(*(range(shape[d]) for d in dims)):
            m = list(c)
            for d, v in zip(dims, sub, strict=True):
                m[d] = v
            members.append(tuple(m))
        out[c] = (members.index(c), members)
    return out


def reference(mesh, axis, x, leaf_fn):
    """Per-device numpy results: `leaf_fn(idx, [member arrays])` for every device."""
    g = groups(mesh, axis)

    def per_leaf(xl):
        res = {c: leaf_fn(i, [xl[m] for m in members]) for c, (i, members) in g.items()}
        shape = tuple(mesh.shape[n] for n in mesh.axis_names)
        first = res[next(iter(res))]
        out = np.zeros(shape + np.shape(first), np.asarray(first).dtype)
        for c, v in res.items():
            out[c] = v
        return out

    return jax.tree.map(per_leaf, x)


def make_input(mesh, seed=0):
    shape = tuple(mesh.shape[n] for n in mesh.axis_names)
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal(shape + (8, 4)).astype(np.float32),
        "b": [rng.standard_normal(shape + (16, 2)).astype(np.float32)],
    }


def assert_tree_close(got, want, atol=1e-5):
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol), got, want
    )


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "op,np_fn",
    [
        (C.psum, lambda xs: np.sum(xs, 0)),
        (C.pmean, lambda xs: np.mean(xs, 0)),
        (C.pmax, lambda xs: np.max(xs, 0)),
        (C.pmin, lambda xs: np.min(xs, 0)),
    ],
    ids=["psum", "pmean", "pmax", "pmin"],
)
def test_reductions(mesh_name, axis, op, np_fn):
    mesh = _mesh(mesh_name)
    x = make_input(mesh)
    got = per_device(lambda v: op(v, axis), mesh, x)
    want = reference(mesh, axis, x, lambda i, xs: np_fn(np.stack(xs)))
    assert_tree_close(got, want)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tiled", [False, True], ids=["stacked", "tiled"])
@pytest.mark.parametrize("dim", [0, 1])
def test_all_gather(mesh_name, axis, tiled, dim):
    mesh = _mesh(mesh_name)
    x = make_input(mesh)
    got = per_device(lambda v: C.all_gather(v, axis, dim=dim, tiled=tiled), mesh, x)
    join = np.concatenate if tiled else np.stack
    want = reference(mesh, axis, x, lambda i, xs: join(xs, axis=dim))
    assert_tree_close(got, want)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    expect: list[int] = [8, 4]
    if tiled:
        expect[dim] *= n
    else:
        expect.insert(dim, n)
    assert got["a"].shape[len(mesh.axis_names) :] == tuple(expect)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
def test_reduce_scatter_tiled(mesh_name, axis):
    mesh = _mesh(mesh_name)
    x = make_input(mesh)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    got = per_device(lambda v: C.reduce_scatter(v, axis, tiled=True), mesh, x)
    want = reference(mesh, axis, x, lambda i, xs: np.split(np.sum(xs, 0), n, axis=0)[i])
    assert_tree_close(got, want)
    assert got["a"].shape[len(mesh.axis_names) :] == (8 // n, 4)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dim", [0, 1])
def test_reduce_scatter_stacked(mesh_name, axis, dim):
    mesh = _mesh(mesh_name)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    shape = tuple(mesh.shape[a] for a in mesh.axis_names)
    rng = np.random.default_rng(1)
    local = (n, 3) if dim == 0 else (3, n)
    x = {"w": rng.standard_normal(shape + local).astype(np.float32)}
    got = per_device(lambda v: C.reduce_scatter(v, axis, dim=dim), mesh, x)
    want = reference(mesh, axis, x, lambda i, xs: np.take(np.sum(xs, 0), i, axis=dim))
    assert_tree_close(got, want)
    assert got["w"].shape[len(shape) :] == (3,)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
def test_broadcast_from_source_3(mesh_name, axis):
    mesh = _mesh(mesh_name)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    source = 3 if n > 3 else 1
    x = make_input(mesh)
    got = per_device(lambda v: C.broadcast(v, axis, source=source), mesh, x)
    want = reference(mesh, axis, x, lambda i, xs: xs[source])
    assert_tree_close(got, want, atol=0)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("split_dim,concat_dim", [(0, 1), (1, 0), (0, 0)])
def test_all_to_all_tiled(mesh_name, axis, split_dim, concat_dim):
    mesh = _mesh(mesh_name)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    shape = tuple(mesh.shape[a] for a in mesh.axis_names)
    rng = np.random.default_rng(2)
    x = {"a": rng.standard_normal(shape + (8, 16)).astype(np.float32)}

    def ref(i, xs):
        # Device i receives chunk i of every device's split dim, in source order.
        pieces = [np.split(xj, n, axis=split_dim)[i] for xj in xs]
        return np.concatenate(pieces, axis=concat_dim)

    got = per_device(
        lambda v: C.all_to_all(v, axis, split_dim=split_dim, concat_dim=concat_dim),
        mesh,
        x,
    )
    assert_tree_close(got, reference(mesh, axis, x, ref), atol=0)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
def test_all_to_all_stacked(mesh_name, axis):
    mesh = _mesh(mesh_name)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    shape = tuple(mesh.shape[a] for a in mesh.axis_names)
    rng = np.random.default_rng(3)
    x = {"a": rng.standard_normal(shape + (n, 5)).astype(np.float32)}
    got = per_device(
        lambda v: C.all_to_all(v, axis, split_dim=0, concat_dim=1, tiled=False),
        mesh,
        x,
    )
    # Device i gets row i of every device, stacked by source at dim 1: (5, n).
    want = reference(mesh, axis, x, lambda i, xs: np.stack([xj[i] for xj in xs], 1))
    assert_tree_close(got, want, atol=0)


def test_all_to_all_reshards_rows_to_columns():
    """The docstring's example: a row-sharded (8, 4) array becomes column-sharded."""
    mesh = make_mesh(devices=jax.devices()[:4], data=4)
    glob = np.arange(32, dtype=np.float32).reshape(8, 4)
    f = spmd(
        lambda v: C.all_to_all(v, "data", split_dim=1, concat_dim=0),
        None,
        mesh,
        in_specs=(P("data"),),
        out_specs=P(None, "data"),
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(glob)), glob)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
def test_ppermute_partial(mesh_name, axis):
    mesh = _mesh(mesh_name)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    perm = [(i, i + 1) for i in range(n - 1)]  # nobody sends to device 0
    x = make_input(mesh)
    got = per_device(lambda v: C.ppermute(v, axis, perm), mesh, x)
    want = reference(
        mesh, axis, x, lambda i, xs: xs[i - 1] if i > 0 else np.zeros_like(xs[0])
    )
    assert_tree_close(got, want, atol=0)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("offset", [1, -1, 3])
def test_shift(mesh_name, axis, offset):
    mesh = _mesh(mesh_name)
    x = make_input(mesh)
    got = per_device(lambda v: C.shift(v, axis, offset), mesh, x)
    want = reference(mesh, axis, x, lambda i, xs: xs[(i - offset) % len(xs)])
    assert_tree_close(got, want, atol=0)


@pytest.mark.parametrize("mesh_name,axis", CASES, ids=CASE_IDS)
def test_axis_index_and_size(mesh_name, axis):
    mesh = _mesh(mesh_name)
    x = make_input(mesh)
    sizes = []

    def fn(v):
        sizes.append(C.axis_size(axis))
        return C.axis_index(axis)

    got = per_device(fn, mesh, x)
    n = math.prod(mesh.shape[a] for a in _names(axis))
    assert sizes == [n]
    want = reference(mesh, axis, {"i": x["a"]}, lambda i, xs: np.int32(i))["i"]
    np.testing.assert_array_equal(got, want)


def test_pvary_is_idempotent_and_free():
    mesh = make_mesh(data=8)

    def body(w, x):
        w1 = C.pvary(w, "data")
        w2 = C.pvary(w1, "data")  # already varying: left as is, no error
        assert jax.typeof(w2) == jax.typeof(w1)
        return C.pmean(w2 * x.sum(), "data")

    f = jax.jit(spmd(body, None, mesh, in_specs=(P(), P("data"))))
    x = np.arange(8, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(f(np.float32(2.0), x)), 2.0 * x.mean())


def test_vmap_axis_names_are_accepted():
    """Axis names bound by `jax.vmap` are not mesh axes, but are valid."""
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    got = jax.vmap(lambda r: C.psum(r, "batch"), axis_name="batch")(x)
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(x.sum(0), (8, 3)))
    idx = jax.vmap(lambda r: C.axis_index("batch"), axis_name="batch")(x)
    np.testing.assert_array_equal(np.asarray(idx), np.arange(8))


# --- errors -------------------------------------------------------------------------


def _run_2x4(fn):
    mesh = make_mesh(data=2, model=4)
    f = spmd(fn, None, mesh, in_specs=(P("data", "model"),), out_specs=P())
    return jax.jit(f)(np.ones((8, 8), np.float32))


@pytest.mark.parametrize(
    "op",
    [
        lambda v, a: C.psum(v, a),
        lambda v, a: C.all_gather(v, a),
        lambda v, a: C.ppermute(v, a, [(0, 1)]),
        lambda v, a: C.axis_index(a),
    ],
    ids=["psum", "all_gather", "ppermute", "axis_index"],
)
def test_misspelled_axis_under_nested_jit(op):
    def body(x):
        inner = jax.jit(lambda v: jax.jit(lambda u: op(u, "dta"))(v))
        return inner(x)

    with pytest.raises(
        CollectiveError,
        match=(
            r"got axis 'dta', but the mesh has axes \('data', 'model'\)\.\n"
            r"Fix: did you mean 'data'\?"
        ),
    ):
        _run_2x4(body)


def test_misspelled_axis_message_names_the_collective():
    with pytest.raises(
        CollectiveError,
        match=r"^`tx.collectives.pmean` got axis 'modle', but the mesh has axes "
        r"\('data', 'model'\)\.\nFix: did you mean 'model'\?",
    ) as info:
        _run_2x4(lambda x: jax.jit(lambda v: C.pmean(v, ("data", "modle")))(x))
    assert info.value.suggestion == "did you mean 'model'?"
    assert info.value.message == (
        "`tx.collectives.pmean` got axis 'modle', but the mesh has axes "
        "('data', 'model')."
    )


def test_unknown_axis_without_close_match_lists_axes():
    with pytest.raises(CollectiveError, match=r"Fix: use one of \('data', 'model'\)"):
        _run_2x4(lambda x: C.psum(x, "pipeline"))


def test_collective_outside_spmd():
    with pytest.raises(
        CollectiveError,
        match=r"outside a per-device program\. No mesh is active\.\n"
        r"Fix: Collectives must run inside `tx.spmd` \(or `jax.shard_map`\)",
    ):
        C.psum(jnp.ones(3), "data")
    with pytest.raises(CollectiveError, match="must run inside `tx.spmd`"):
        jax.jit(lambda v: C.axis_index("data"))(jnp.ones(3))


def test_collective_under_set_mesh_but_outside_shard_map():
    mesh = make_mesh(data=8)
    with jax.set_mesh(mesh):
        with pytest.raises(CollectiveError, match=r"has no manual axes here"):
            jax.jit(lambda v: C.psum(v, "data"))(jnp.ones(8))


def test_axis_not_manual_in_partial_shard_map():
    mesh = make_mesh(data=2, model=4)
    f = spmd(
        lambda x: C.psum(x, "model"),
        None,
        mesh,
        in_specs=(P("data"),),
        out_specs=P(),
        axis_names=("data",),
    )
    with pytest.raises(CollectiveError, match=r"'model', which is in the mesh"):
        jax.jit(f)(np.ones((8, 8), np.float32))


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda v: C.psum(v, 3), r"expects a mesh axis name"),  # pyright: ignore
        (lambda v: C.psum(v, ("data", "data")), r"repeats a name"),
        (lambda v: C.broadcast(v, "model", source=4), r"source=4.*has 4 devices"),
        (lambda v: C.ppermute(v, "model", [(0, 4)]), r"pair \(0, 4\)"),
        (lambda v: C.ppermute(v, "model", [(0, 1), (2, 1)]), r"destination index 1"),
        (lambda v: C.reduce_scatter(v, "model", dim=1), r"needs dim 1 to be exactly"),
        (lambda v: C.all_gather(v, "model", dim=3), r"dim=3 for a leaf of shape"),
        (
            lambda v: C.all_to_all(v, "data", split_dim=0, concat_dim=1, tiled=False),
            r"split_dim 0 to be exactly 2",
        ),
    ],
)
def test_bad_arguments(fn, match):
    # Local shard shape (4, 2) on the 2x4 mesh.
    with pytest.raises(CollectiveError, match=match):
        _run_2x4(fn)
