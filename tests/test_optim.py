import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import titanax.optim as topt
from titanax._errors import TrainerError


def _params():
    return {
        "w": jnp.array([[1.0, -2.0], [0.5, 3.0]]),
        "b": jnp.array([0.25, -1.0]),
    }


def _run(tx, params, grad_fn, steps):
    """`steps` optimizer steps; returns the params after each."""
    state = tx.init(params)
    history = []
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


# A quadratic with a different curvature per entry: loss = 0.5 * sum(c * p**2).
_CURVATURE = {"w": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([0.5, 5.0])}


def _quadratic_grad(params):
    return jax.tree.map(lambda c, p: jnp.asarray(c, p.dtype) * p, _CURVATURE, params)


# Schedules


def test_warmup_cosine_values():
    peak, end = 1e-3, 1e-4
    schedule = topt.warmup_cosine(peak, warmup_steps=10, total_steps=110, end_lr=end)
    assert float(schedule(0)) == 0.0
    assert math.isclose(float(schedule(5)), 5e-4, rel_tol=1e-6)
    assert math.isclose(float(schedule(10)), peak, rel_tol=1e-6)
    # A quarter into the decay: end + (peak - end) * (1 + cos(pi / 4)) / 2.
    quarter = end + (peak - end) * (1 + math.cos(math.pi / 4)) / 2
    assert math.isclose(float(schedule(35)), quarter, rel_tol=1e-5)
    assert math.isclose(float(schedule(60)), (peak + end) / 2, rel_tol=1e-5)
    assert math.isclose(float(schedule(110)), end, rel_tol=1e-5)
    assert math.isclose(float(schedule(500)), end, rel_tol=1e-5)


def test_warmup_cosine_without_warmup_starts_at_peak():
    schedule = topt.warmup_cosine(0.1, warmup_steps=0, total_steps=100)
    assert math.isclose(float(schedule(0)), 0.1, rel_tol=1e-6)
    assert math.isclose(float(schedule(50)), 0.05, rel_tol=1e-5)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_constant_and_warmup_constant():
    assert float(topt.constant(3e-4)(12345)) == pytest.approx(3e-4)
    schedule = topt.warmup_constant(0.2, warmup_steps=4)
    values = [float(schedule(k)) for k in range(7)]
    assert values == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])


def test_schedule_errors():
    with pytest.raises(TrainerError, match="`total_steps` to be larger than"):
        topt.warmup_cosine(1e-3, warmup_steps=100, total_steps=100)
    with pytest.raises(TrainerError, match=r"`peak_lr` to be a finite number >= 0"):
        topt.warmup_cosine(-1.0, warmup_steps=1, total_steps=10)
    with pytest.raises(TrainerError, match=r"`warmup_steps` to be an integer >= 0"):
        topt.warmup_cosine(1e-3, warmup_steps=1.5, total_steps=10)
    with pytest.raises(TrainerError, match="`lr` to be a float, got str"):
        topt.constant("0.1")


# AdamW


def _adamw_by_hand(params, lr, b1, b2, eps, wd, steps):
    """Adam with decoupled weight decay on matrices only, in float64 numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    history = []
    for t in range(1, steps + 1):
        new = {}
        for k in p:
            g = _CURVATURE[k] * p[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            direction = m_hat / (np.sqrt(v_hat) + eps)
            if p[k].ndim >= 2:
                direction = direction + wd * p[k]
            new[k] = p[k] - lr * direction
        p = new
        history.append(p)
    return history


def test_adamw_matches_hand_computation_and_optax():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.95, 1e-8, 0.3
    tx = topt.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    ours, _ = _run(tx, _params(), _quadratic_grad, steps=3)
    expected = _adamw_by_hand(_params(), lr, b1, b2, eps, wd, steps=3)
    reference = optax.adamw(
        lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=topt.default_weight_decay_mask
    )
    theirs, _ = _run(reference, _params(), _quadratic_grad, steps=3)
    for got, want, other in zip(ours, expected, theirs, strict=True):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
            np.testing.assert_allclose(got[k], other[k], rtol=1e-7)
    # First step by hand: Adam's first direction is g / (|g| + eps) = sign(g).
    w0 = _params()["w"]
    first = w0 - lr * (jnp.sign(w0) + wd * w0)
    np.testing.assert_allclose(ours[0]["w"], first, rtol=1e-6)


def test_weight_decay_skips_1d_params_by_default():
    # Zero gradients: Adam's direction is 0 / (0 + eps) = 0, only the decay moves.
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((3,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = topt.adamw(0.1, weight_decay=0.5)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], np.full((2, 2), -0.1))  # -lr * wd * 2
    np.testing.assert_array_equal(updates["b"], np.zeros(3))

    everything = topt.adamw(0.1, weight_decay=0.5, weight_decay_mask=None)
    updates, _ = everything.update(zeros, everything.init(params), params)
    np.testing.assert_allclose(updates["b"], np.full(3, -0.1))

    only_b = topt.adamw(
        0.1, weight_decay=0.5, weight_decay_mask={"w": False, "b": True}
    )
    updates, _ = only_b.update(zeros, only_b.init(params), params)
    np.testing.assert_array_equal(updates["w"], np.zeros((2, 2)))
    np.testing.assert_allclose(updates["b"], np.full(3, -0.1))


def test_clip_norm_clips_gradients_first():
    params = {"a": jnp.zeros(2)}
    grads = {"a": jnp.array([6.0, 8.0])}  # global norm 10
    tx = topt.sgd(1.0, clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-6)

    # Below the threshold nothing changes.
    small = topt.sgd(1.0, clip_norm=20.0)
    updates, _ = small.update(grads, small.init(params), params)
    np.testing.assert_allclose(updates["a"], [-6.0, -8.0], rtol=1e-6)

    # AdamW sees the clipped gradient: its first moment is (1 - b1) * clipped.
    adam = topt.adamw(1e-3, b1=0.9, clip_norm=1.0)
    _, state = adam.update(grads, adam.init(params), params)
    (adam_state,) = [
        s
        for s in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    np.testing.assert_allclose(adam_state.mu["a"], [0.06, 0.08], rtol=1e-6)


# Learning rate in the state


def test_current_lr_follows_the_schedule():
    peak, warmup, total = 1.0, 4, 8
    schedule = topt.warmup_cosine(peak, warmup, total)
    tx = topt.sgd(peak, warmup_steps=warmup, total_steps=total)
    params = {"a": jnp.zeros(())}
    grads = {"a": jnp.ones(())}
    state = tx.init(params)
    assert float(topt.current_lr(state)) == float(schedule(0))
    update = jax.jit(tx.update)
    for k in range(1, 11):
        updates, state = update(grads, state, params)
        lr = topt.current_lr(state)
        assert lr is not None
        # After k updates the state holds the rate the k-th update used: s(k - 1).
        assert float(lr) == pytest.approx(float(schedule(k - 1)), abs=1e-7)
        assert float(updates["a"]) == pytest.approx(-float(lr), abs=1e-7)
    # Inside a bigger PyTree (a train state) it is found too.
    assert float(topt.current_lr({"step": 3, "opt": state})) == float(lr)


def test_current_lr_constant_and_foreign_states():
    params = {"a": jnp.zeros(3)}
    state = topt.adamw(3e-4).init(params)
    assert float(topt.current_lr(state)) == pytest.approx(3e-4)
    assert topt.current_lr(optax.adam(1e-3).init(params)) is None
    assert topt.current_lr(None) is None


# SGD


def test_sgd_momentum_matches_hand_computation():
    lr, m = 0.1, 0.9
    grads = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([-2.0, 0.5])]
    params = {"a": jnp.zeros(2)}
    for nesterov in (False, True):
        tx = topt.sgd(lr, momentum=m, nesterov=nesterov)
        reference = optax.sgd(lr, momentum=m, nesterov=nesterov)
        state, ref_state = tx.init(params), reference.init(params)
        buffer = np.zeros(2)
        for g in grads:
            buffer = g + m * buffer
            expected = -lr * (g + m * buffer if nesterov else buffer)
            updates, state = tx.update({"a": jnp.asarray(g)}, state, params)
            ref, ref_state = reference.update({"a": jnp.asarray(g)}, ref_state)
            np.testing.assert_allclose(updates["a"], expected, rtol=1e-6)
            np.testing.assert_allclose(updates["a"], ref["a"], rtol=1e-7)
    # The first two by hand, without nesterov: -0.1 * [1, 2], then
    # -0.1 * ([3, -1] + 0.9 * [1, 2]) = [-0.39, -0.08].
    tx = topt.sgd(lr, momentum=m)
    state = tx.init(params)
    _, state = tx.update({"a": jnp.array([1.0, 2.0])}, state, params)
    updates, _ = tx.update({"a": jnp.array([3.0, -1.0])}, state, params)
    np.testing.assert_allclose(updates["a"], [-0.39, -0.08], rtol=1e-6)


def test_sgd_weight_decay_is_added_to_the_gradient():
    # PyTorch-style: g + wd * p before the momentum; 1-D params are not decayed.
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = topt.sgd(0.1, momentum=0.5, weight_decay=0.25)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], np.full((2, 2), -0.15))  # 1 + 0.25 * 2
    np.testing.assert_allclose(updates["b"], np.full(2, -0.1))


def test_update_is_jittable_and_state_types_are_stable():
    params = _params()
    tx = topt.adamw(1e-3, weight_decay=0.1, clip_norm=1.0, total_steps=10)
    state = tx.init(params)
    before = jax.tree.map(jax.typeof, state)
    _, state = jax.jit(tx.update)(_quadratic_grad(params), state, params)
    assert jax.tree.map(jax.typeof, state) == before


# Descriptions and argument errors


def test_describe_optimizer():
    tx = topt.adamw(
        1e-3,
        b2=0.99,
        weight_decay=0.1,
        clip_norm=1.0,
        warmup_steps=100,
        total_steps=2000,
        end_lr=1e-4,
    )
    assert topt.describe_optimizer(tx) == (
        "adamw(lr=1e-3 warmup 100 -> cosine to 1e-4 over 2000, b1=0.9, b2=0.99, "
        "wd=0.1, clip=1)"
    )
    info = topt.optimizer_info(tx)
    assert info is not None and info.name == "adamw" and info.learning_rate == 1e-3
    assert topt.describe_optimizer(topt.sgd(0.1, momentum=0.9, nesterov=True)) == (
        "sgd(lr=0.1, momentum=0.9, nesterov)"
    )
    scheduled = topt.adamw(topt.warmup_cosine(3e-4, 10, 100), b2=0.95)
    assert topt.describe_optimizer(scheduled) == (
        "adamw(lr=3e-4 warmup 10 -> cosine to 0 over 100, b1=0.9, b2=0.95)"
    )
    assert topt.describe_optimizer(topt.adamw(optax.constant_schedule(0.1))) == (
        "adamw(lr=schedule, b1=0.9, b2=0.999)"
    )
    assert topt.describe_optimizer(optax.adamw(1e-3)) == "custom optax transformation"
    assert topt.optimizer_info(optax.sgd(1e-3)) is None


def test_recipe_argument_errors():
    with pytest.raises(TrainerError, match="Nesterov needs a momentum"):
        topt.sgd(0.1, nesterov=True)
    with pytest.raises(TrainerError, match="expected one or the other"):
        topt.adamw(topt.constant(0.1), warmup_steps=10)
    with pytest.raises(TrainerError, match="without `total_steps`"):
        topt.adamw(0.1, end_lr=0.01)
    with pytest.raises(TrainerError, match=r"`b1` to be a number in \[0, 1\), got 1.5"):
        topt.adamw(0.1, b1=1.5)
    with pytest.raises(TrainerError, match="`clip_norm` to be a number > 0 or None"):
        topt.adamw(0.1, clip_norm=0.0)
    with pytest.raises(TrainerError, match="`momentum` to be a number in"):
        topt.sgd(0.1, momentum=1.0)
