"""`tx.spmd` and Titanax's gradient rule under `jax.shard_map`.

The N× trap (see `jax-notes.md`): under `check_vma=True`, a replicated parameter is
invariant and `jax.grad` already sums its gradient over the axis, so "grad, then pmean"
is N times too large. Plain SGD makes that visible, so the DP tests use it.
"""

import re
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import titanax as tx
from titanax import _hlo
from titanax._errors import CollectiveError, ShardingError
from titanax._mesh import make_mesh
from titanax._plan import DP, TP, Plan
from titanax.parallel import collectives as C
from titanax.parallel import grad, spmd, spmd_specs, value_and_grad

LR = 0.1


class TinyMLP(eqx.Module):
    """Two layers; `act` is a non-array leaf that must not reach `jax.shard_map`."""

    w1: Float[Array, "in mlp"]
    b1: Float[Array, "mlp"]
    w2: Float[Array, "mlp out"]
    b2: Float[Array, "out"]
    act: Callable[[Array], Array]

    def __init__(self, seed, d_in=4, d_hidden=16, d_out=3):
        # numpy init: eager jax.random would compile a kernel per shape.
        rng = np.random.default_rng(seed)
        self.w1 = jnp.asarray(rng.standard_normal((d_in, d_hidden)) / d_in**0.5, "f4")
        self.b1 = jnp.asarray(0.1 * rng.standard_normal(d_hidden), "f4")
        self.w2 = jnp.asarray(rng.standard_normal((d_hidden, d_out)) / 4.0, "f4")
        self.b2 = jnp.asarray(0.1 * rng.standard_normal(d_out), "f4")
        self.act = jnp.tanh

    def __call__(self, x):
        return self.act(x @ self.w1 + self.b1) @ self.w2 + self.b2


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def sgd(model, grads):
    return eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))


def make_data(seed, n=64):
    rng = np.random.default_rng(1000 + seed)
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "y": rng.standard_normal((n, 3)).astype(np.float32),
    }


def max_diff(a, b):
    a, b = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def spmd_dp_step(model, batch):
    """The hand-written per-device DP step: local grads, one explicit pmean."""
    loss, grads = value_and_grad(loss_fn)(model, batch)
    grads = C.pmean(grads, "data")
    return sgd(model, grads), C.pmean(loss, "data")


def sgd_step(model, batch):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    return sgd(model, grads), loss


single_device_step = eqx.filter_jit(sgd_step)


def jit_mode_step(static, mesh):
    """The default mode: plain `jax.jit`, batch sharded on `data`, params replicated."""

    def step(params, batch):
        model, loss = sgd_step(eqx.combine(params, static), batch)
        return eqx.filter(model, eqx.is_array), loss

    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
    return jax.jit(step, in_shardings=shardings)


@pytest.fixture
def dp():
    mesh = make_mesh(data=8)
    return Plan(dp=DP("data")), mesh


def test_dp_step_equals_single_device_and_jit_mode(dp):
    plan, mesh = dp
    model = TinyMLP(0)
    step = spmd(spmd_dp_step, plan, mesh)  # compiled with jax.jit inside

    static = eqx.filter(model, eqx.is_array, inverse=True)
    jit_step = jit_mode_step(static, mesh)

    # Place the model as the steps will return it, so each step compiles once.
    placed = jax.device_put(eqx.filter(model, eqx.is_array), NamedSharding(mesh, P()))
    m_spmd = m_jit = eqx.combine(placed, static)
    m_ref = model  # on one device
    for step_i in range(3):
        batch = make_data(step_i)
        m_spmd, l_spmd = step(m_spmd, batch)
        m_ref, l_ref = single_device_step(m_ref, batch)
        m_jit, l_jit = jit_step(eqx.filter(m_jit, eqx.is_array), batch)
        m_jit = eqx.combine(m_jit, static)
        assert abs(float(l_spmd) - float(l_ref)) <= 1e-6
        assert abs(float(l_jit) - float(l_ref)) <= 1e-6
        assert max_diff(m_spmd, m_ref) <= 1e-6
        assert max_diff(m_jit, m_ref) <= 1e-6
    assert m_spmd.act is jnp.tanh  # the static half came back
    assert max_diff(m_spmd, model) > 1e-3  # and training moved the parameters
    assert len(m_ref.w1.devices()) == 1


def test_raw_shard_map_grad_then_pmean_is_8x(dp):
    """The trap, documented: without Titanax's marking the gradient is 8x too big."""
    _, mesh = dp
    model = TinyMLP(0)
    batch = make_data(2)
    params, static = eqx.partition(model, eqx.is_array)

    def body(p, b):
        g = jax.grad(lambda q: loss_fn(eqx.combine(q, static), b))(p)
        return jax.lax.pmean(g, "data")  # the classic pmap recipe

    raw = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    )(params, batch)
    ref = eqx.filter_grad(loss_fn)(model, batch)
    for got, want in zip(jax.tree.leaves(raw), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(got, 8.0 * want, rtol=1e-5, atol=1e-6)

    # The same body with Titanax's value_and_grad: the right gradient.
    def fixed(p, b):
        g = grad(lambda q: loss_fn(eqx.combine(q, static), b))(p)
        return jax.lax.pmean(g, "data")

    ok = jax.jit(
        jax.shard_map(fixed, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    )(params, batch)
    assert max_diff(ok, eqx.filter(ref, eqx.is_array)) <= 1e-6


def test_plain_jax_grad_then_pmean_is_refused(dp):
    plan, mesh = dp

    def trap_step(model, batch):
        grads = eqx.filter_grad(loss_fn)(model, batch)  # already summed over "data"
        return C.pmean(grads, "data")

    with pytest.raises(
        CollectiveError,
        match=r"`tx.collectives.pmean` got a value that is already invariant along "
        r"\('data',\).*\nFix: If these are gradients of replicated parameters, "
        r"`jax.grad` has already summed them",
    ):
        spmd(trap_step, plan, mesh)(TinyMLP(0), make_data(3))


def _count_all_reduce(hlo: str | None) -> int:
    # Ops, not names: instructions read `%name = f32[..] all-reduce(...)` (or
    # `all-reduce-start(` when async); a tuple all-reduce of several gradients is one.
    return len(re.findall(r"\ball-reduce(?:-start)?\(", hlo or ""))


def test_hlo_has_one_gradient_all_reduce(dp):
    plan, mesh = dp
    model, batch = TinyMLP(0), make_data(4)

    def grads_only(model, batch):
        loss, grads = value_and_grad(loss_fn)(model, batch)
        return sgd(model, C.pmean(grads, "data"))

    hlo = spmd(grads_only, plan, mesh).lower(model, batch).compile().as_text()
    assert _count_all_reduce(hlo) == 1

    # With the loss reduced too for logging: XLA's combiner merges both into the one
    # tuple all-reduce, like the jit mode's.
    hlo = spmd(spmd_dp_step, plan, mesh).lower(model, batch).compile()
    spmd_count = _count_all_reduce(hlo.as_text() or "")
    params, static = eqx.partition(model, eqx.is_array)
    jit_hlo = jit_mode_step(static, mesh).lower(params, batch).compile().as_text()
    assert spmd_count == _count_all_reduce(jit_hlo) == 1


def test_tp_and_dp_specs_from_plan():
    """2x4 mesh, DP on `data`, Megatron TP on `model`; specs derived from the plan."""
    mesh = make_mesh(data=2, model=4)
    plan = Plan(dp=DP("data"), tp=TP("model", rules={"mlp": "model"}))
    model, batch = TinyMLP(0), make_data(5)
    specs = spmd_specs(model, plan, mesh)
    assert specs.w1 == P(None, "model") and specs.w2 == P("model", None)
    assert specs.b1 == P("model") and specs.b2 == P(None) and specs.act is None
    assert spmd_specs(batch, plan, mesh) == {"x": P("data", None), "y": P("data", None)}

    def body(model, batch):
        assert model.w1.shape == (4, 4) and model.w2.shape == (4, 3)
        assert batch["x"].shape == (32, 4)

        def local_loss(m, b):
            h = m.act(b["x"] @ m.w1 + m.b1)  # column-parallel: (32, 4)
            y = C.psum(h @ m.w2, "model") + m.b2  # row-parallel: one all-reduce
            return jnp.mean((y - b["y"]) ** 2), y

        (loss, y), grads = value_and_grad(local_loss, has_aux=True)(model, batch)
        return C.pmean(grads, "data"), y, C.pmean(loss, "data")

    f = spmd(body, plan, mesh, out_specs=(specs, P("data"), P()))
    grads, y, loss = f(model, batch)
    ref_loss, ref_grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    np.testing.assert_allclose(y, model(batch["x"]), rtol=1e-5, atol=1e-6)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6
    assert max_diff(grads, ref_grads) <= 1e-6
    assert grads.w1.sharding.spec == P(None, "model")


def test_value_and_grad_outside_a_mesh_is_filtered_value_and_grad():
    model, batch = TinyMLP(0), make_data(6)
    loss, grads = value_and_grad(loss_fn)(model, batch)
    ref_loss, ref_grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    assert float(loss) == float(ref_loss)
    assert grads.act is None and max_diff(grads, ref_grads) == 0.0


def test_explicit_in_specs_and_derived_per_argument(dp):
    plan, mesh = dp
    model, batch = TinyMLP(0), make_data(7)
    # None entries are derived from the plan; the batch spec is given explicitly.
    f = spmd(spmd_dp_step, plan, mesh, in_specs=(None, P("data")))
    m1, l1 = f(model, batch)
    m2, l2 = single_device_step(model, batch)
    assert max_diff(m1, m2) <= 1e-6 and abs(float(l1) - float(l2)) <= 1e-6


def test_spmd_argument_errors(dp):
    plan, mesh = dp
    model, batch = TinyMLP(0), make_data(8)
    with pytest.raises(
        CollectiveError, match="no plan to derive the spec of argument 0"
    ):
        spmd(spmd_dp_step, None, mesh)(model, batch)
    with pytest.raises(CollectiveError, match="got 2 positional arguments"):
        spmd(spmd_dp_step, plan, mesh, in_specs=(P(),))(model, batch)
    with pytest.raises(ShardingError, match=r"\['x'\] has shape \(60, 4\)"):
        spmd(spmd_dp_step, plan, mesh)(model, make_data(9, n=60))
    with pytest.raises(CollectiveError, match="axis_names"):
        spmd(spmd_dp_step, plan, mesh, axis_names=("dta",))


def test_psum_of_a_python_number_counts_devices(dp):
    """The `psum(1, axis)` idiom is not the trap and is allowed."""
    plan, mesh = dp
    f = spmd(lambda b: C.psum(1, "data") * jnp.ones(()), plan, mesh)
    assert float(f(make_data(10))) == 8.0


def test_spmd_inside_an_outer_jit_over_partitioned_arrays(dp):
    """How a trainer composes it: jax.jit over the array half, static half closed."""
    plan, mesh = dp
    model, batch = TinyMLP(0), make_data(11)
    params, static = eqx.partition(model, eqx.is_array)
    inner = spmd(spmd_dp_step, plan, mesh)

    @jax.jit
    def outer(params, batch):
        new, loss = inner(eqx.combine(params, static), batch)
        return eqx.filter(new, eqx.is_array), loss

    new_params, loss = outer(params, batch)
    ref_model, ref_loss = single_device_step(model, batch)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6
    assert max_diff(new_params, ref_model) <= 1e-6


# --- Trainer mode="spmd" ------------------------------------------------------------


class _ModeMLP(eqx.Module):
    w1: jax.Array
    w2: jax.Array

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.w1 = jax.random.normal(k1, (16, 32)) * 0.3
        self.w2 = jax.random.normal(k2, (32, 4)) * 0.3

    def __call__(self, x):
        return jnp.tanh(x @ self.w1) @ self.w2


def _mode_loss(model, batch, key):
    del key
    err = model(batch["x"]) - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def _mode_batches():
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(32, 16)).astype(np.float32),
            "y": rng.normal(size=(32, 4)).astype(np.float32),
        }
        for _ in range(4)
    ]


@pytest.mark.parametrize("accumulate", [1, 2], ids=["dp8", "dp8_acc2"])
def test_trainer_spmd_mode_equals_jit_mode_and_single_device(accumulate):
    model = _ModeMLP(jax.random.key(1))
    batches = _mode_batches()
    lr = 0.5
    # The single-device reference: plain SGD on the full batch.
    params = model
    reference = []
    for batch in batches:
        loss, grads = eqx.filter_value_and_grad(lambda m, b: _mode_loss(m, b, None)[0])(
            params, batch
        )
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        reference.append(float(loss))

    mesh = tx.make_mesh(data=8)
    plan = tx.Plan(dp=tx.DP(accumulate_steps=accumulate))
    results = {}
    for mode in ("jit", "spmd"):
        step = tx.make_train_step(_mode_loss, optax.sgd(lr), plan, mesh, mode=mode)
        state = step.init(model, 0)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results[mode] = (losses, state.model)
    for mode, (losses, final) in results.items():
        np.testing.assert_allclose(losses, reference, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(final.w1, params.w1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(final.w2, params.w2, rtol=1e-6, atol=1e-7)


def test_trainer_spmd_mode_hlo_has_one_gradient_all_reduce():
    mesh = tx.make_mesh(data=8)
    counts = {}
    for mode in ("jit", "spmd"):
        step = tx.make_train_step(
            _mode_loss, optax.sgd(0.1), tx.Plan(dp=tx.DP()), mesh, mode=mode
        )
        state = step.init(_ModeMLP(jax.random.key(0)), 0)
        text = step.lower(state, _mode_batches()[0]).compile().as_text()
        found = _hlo.collectives(text, mesh)
        counts[mode] = [(c.kind, c.axes, c.in_loop) for c in found]
    # One (tuple) all-reduce over `data` of the gradients, loss and metrics.
    assert counts["spmd"] == [("all-reduce", ("data",), False)]
    assert counts["jit"] == counts["spmd"]


def test_trainer_spmd_mode_refuses_parameter_sharding_plans():
    mesh = tx.make_mesh(data=2, model=4)
    with pytest.raises(tx.ArgumentError, match='mode="spmd"') as info:
        tx.make_train_step(
            _mode_loss,
            optax.sgd(0.1),
            tx.Plan(dp=tx.DP(), tp=tx.TP()),
            mesh,
            mode="spmd",
        )
    assert "tx.spmd" in (info.value.suggestion or "")
