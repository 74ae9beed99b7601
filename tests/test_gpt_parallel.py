"""The reference GPT under tensor parallelism: parity, communication and memory.

Parity: the loss and every gradient of one compiled training step under TP=2, 4, 8
and DP=2 x TP=4 equal the single-device step's (fp32, ≤ 1e-5 relative). The gradients
are read from the sharded step itself: the optimizer below stores them in its state.

Communication, read from the compiled HLO of one training step (`baby`, 2 layers,
TP=4): Megatron's 2 all-reduces over `model` per block forward and 2 backward, inside
the layer scan; no all-gather of a whole weight; no collective as large as the
full-vocabulary logits. Under DP x TP every gradient is all-reduced over `data`
exactly once per step (XLA puts the layers' reduction inside the backward scan, once
per layer).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import titanax as tx
from models import gpt_plans
from models.gpt import GPT, GPTConfig, gpt_loss
from titanax._explain import bytes_per_device
from titanax._hlo import collectives

# Eight heads, so TP=8 still gives each device one whole head; mlp 256, vocab 64.
# Biases on, so that every kind of parameter (column- and row-parallel weights and
# biases, vocab-parallel tables, replicated norms) has a gradient to compare.
PARITY = GPTConfig.preset(
    "tiny", n_layer=2, n_head=8, n_embd=64, vocab_size=64, bias=True
)
TP_AXES = {"heads", "mlp", "vocab"}  # the logical axes the TP plan maps to `model`


def _random_gpt(config, seed=0):
    """A GPT with random weights drawn in numpy (building one with JAX's PRNG costs
    seconds of compilation). Norm scales near 1, everything else ~N(0, 0.05)."""
    abstract = eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    arrays = []
    for path, leaf in paths:
        x = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        arrays.append(x + 1 if "scale" in jax.tree_util.keystr(path) else x)
    return eqx.tree_at(lambda m: jax.tree.leaves(m), abstract, arrays)


def _batch(config, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    T = config.block_size
    x = rng.integers(0, config.vocab_size, (batch_size, T + 1)).astype(np.int32)
    return {"x": x[:, :-1], "y": x[:, 1:]}


def _grad_store():
    """An optax 'optimizer' that keeps the gradients in its state and never moves
    the parameters: the step's own (sharded) gradients, read back exactly."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


def _mesh(data=1, model=1):
    return tx.make_mesh(jax.devices()[: data * model], data=data, model=model)


def _plan(data, model):
    if data > 1 and model > 1:
        return gpt_plans.dp_tp()
    if model > 1:
        return gpt_plans.tp()
    if data > 1:
        return gpt_plans.dp()
    return tx.Plan()


def _loss_and_grads(gpt, data, model, batch):
    mesh = _mesh(data, model)
    step = tx.make_train_step(gpt_loss, _grad_store(), _plan(data, model), mesh)
    state = step.init(gpt, 0)  # placed by the plan (copies: `gpt` stays usable)
    state, metrics = step.step(state, batch)
    return float(metrics["loss"]), state.opt_state, state.model


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def reference():
    """The model, a batch, and the loss and gradients of the step on one device."""
    gpt = _random_gpt(PARITY)
    batch = _batch(PARITY, 8)
    return gpt, batch, _loss_and_grads(gpt, 1, 1, batch)


def test_reference_is_the_loss_gradient(reference):
    # The stored gradients are those of the loss: plain `jax.grad`, no Titanax.
    gpt, batch, (ref_loss, ref_grads, _) = reference
    value_and_grad = jax.jit(jax.value_and_grad(lambda m, b: gpt_loss(m, b)[0]))
    loss, grads = value_and_grad(gpt, batch)
    assert abs(float(loss) - ref_loss) <= 1e-6 * abs(ref_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert _rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("data,model", [(1, 2), (1, 4), (1, 8), (2, 4)])
def test_loss_and_every_gradient_match_one_device(reference, data, model):
    gpt, batch, (ref_loss, ref_grads, _) = reference
    loss, grads, params = _loss_and_grads(gpt, data, model, batch)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    paths = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    got = jax.tree.leaves(grads)
    assert len(got) == len(paths) == 17  # every array of the GPT has a gradient
    for (path, want), have in zip(paths, got, strict=True):
        name = jax.tree_util.keystr(path)
        assert have.shape == want.shape, name
        assert _rel_err(have, want) <= 1e-5, (name, _rel_err(have, want))
    # The step really ran sharded: the heads of w_qkv are split over `model`.
    w_qkv = params.blocks.w_qkv
    assert w_qkv.sharding.spec == PartitionSpec(None, None, "model", None, None)
    assert w_qkv.addressable_shards[0].data.shape[2] == PARITY.n_head // model
    assert grads.blocks.w_qkv.sharding.spec == w_qkv.sharding.spec


def _l2_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_trainer_adamw_steps_match_one_device(reference):
    gpt, batch, _ = reference

    def run(data, model):
        losses = []
        trainer = tx.Trainer(
            gpt,
            _plan(data, model),
            optimizer=tx.optim.adamw(1e-3, weight_decay=0.1, clip_norm=1.0),
            loss=gpt_loss,
            mesh=_mesh(data, model),
            log_every=1,
            hooks=[lambda step, m, t: losses.append(m["loss"])],
        )
        state = trainer.fit([batch] * 3, steps=3)  # one batch: the loss must fall
        return losses, state.model

    ref_losses, ref_model = run(1, 1)
    losses, model = run(2, 4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[2] < ref_losses[1] < ref_losses[0]

    # Adam divides by |g|: rounding noise in near-zero gradients becomes a step of
    # up to lr (the k-bias gradient is exactly zero in exact arithmetic; softmax
    # ignores it). So the weights are compared as a whole, in L2.
    def flat(m):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(m)])

    assert _l2_rel(flat(model), flat(ref_model)) <= 1e-5
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(ref_model), strict=True):
        assert _l2_rel(a, b) <= 1e-3


# ----------------------------------------------------------------------------
# Communication and memory: `baby` with 2 layers, TP=4 (and DP=2 x TP=4)

# A scanned stack (`unroll=False`), so each layer's collectives sit in one loop body
# that the counts below can find; unrolled, the same ops repeat per layer.
BABY = GPTConfig.preset("baby", n_layer=2, unroll=False)
B = 8  # global batch


def _compiled(data, model):
    mesh = _mesh(data, model)
    step = tx.make_train_step(gpt_loss, optax.sgd(1.0), _plan(data, model), mesh)
    state = step.init(_random_gpt(BABY), 0)
    hlo = step.lower(state, _batch(BABY, B)).compile().as_text()
    return state, collectives(hlo, mesh)


@pytest.fixture(scope="module")
def tp4():
    return _compiled(1, 4)


@pytest.fixture(scope="module")
def dp2_tp4():
    return _compiled(2, 4)


def _tp_leaves(model):
    """(array, sharded by TP?) per array, from the model's logical axes alone."""
    logical = jax.tree.leaves(
        tx.logical_axes(model), is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
    arrays = jax.tree.leaves(model)
    return [(x, bool(TP_AXES & set(n))) for x, n in zip(arrays, logical, strict=True)]


def _full_weight_bytes(model):
    """Unsharded bytes of each TP-sharded weight, per layer for stacked ones."""
    out = []
    for x, sharded in _tp_leaves(model):
        if sharded:
            n = x.size * x.dtype.itemsize
            out.append(n // BABY.n_layer if x.shape[0] == BABY.n_layer else n)
    return out


def _check_megatron(ops, batch_rows):
    act = batch_rows * BABY.block_size * BABY.n_embd * 4  # one [B, T, C] activation
    model_ar = [c for c in ops if c.kind == "all-reduce" and c.axes == ("model",)]
    in_loop = [c for c in model_ar if c.in_loop]
    # The layer scan runs n_layer times: its forward body holds 2 all-reduces
    # (attention-out and MLP-down, row-parallel), its backward body 2 (the grads of
    # the column-parallel inputs of QKV and MLP-up). Nothing else in the loops.
    assert [c.bytes for c in in_loop] == [act] * 4
    bodies = {}
    for c in in_loop:
        bodies.setdefault(c.computation, []).append(c)
    assert sorted(len(v) for v in bodies.values()) == [2, 2]
    # Outside the loop: the vocab-parallel embedding's forward and the vocab-parallel
    # head's input gradient are one activation each; the rest are [B, T] statistics
    # of the vocab-parallel cross-entropy and scalars.
    outside = [c.bytes for c in model_ar if not c.in_loop]
    assert sum(b >= act for b in outside) == 2, outside
    assert all(b <= act + 64 for b in outside)
    return act


def test_tp4_megatron_all_reduces_per_block(tp4):
    _, ops = tp4
    _check_megatron(ops, B)


def test_tp4_no_weight_all_gather_and_no_full_logits(tp4):
    state, ops = tp4
    smallest_weight = min(_full_weight_bytes(state.model))  # w_attn_out, 64 KiB
    gathers = [c for c in ops if c.kind == "all-gather"]
    # The only all-gathers are of the cross-entropy's per-shard argmax (accuracy):
    # [B, T, 4 shards] values and indices, far smaller than any weight.
    assert all(c.bytes < smallest_weight for c in gathers), gathers
    assert not [c for c in ops if c.kind in ("reduce-scatter", "all-to-all")]
    logits = B * BABY.block_size * BABY.vocab_size * 4
    assert max(c.bytes for c in ops) < logits


def test_dp_tp_gradients_reduced_over_data_once(dp2_tp4):
    state, ops = dp2_tp4
    _check_megatron(ops, B // 2)  # each data shard holds half the batch
    data_ops = [c for c in ops if "data" in c.axes]
    assert all(c.axes == ("data",) and c.kind == "all-reduce" for c in data_ops)
    # XLA puts the stacked layers' DP reduction inside the backward scan (one
    # all-reduce per layer, each of one layer's gradients); the other gradients are
    # reduced after it. Each gradient is reduced exactly once per step: the bytes
    # equal the per-device gradient bytes (plus the loss/accuracy scalars).
    loop_ops = [c for c in data_ops if c.in_loop]
    total = sum(c.bytes * (BABY.n_layer if c.in_loop else 1) for c in data_ops)
    grad_bytes = bytes_per_device(state.model)  # gradients are sharded like params
    per_layer = bytes_per_device(state.model.blocks) // BABY.n_layer
    assert [c.bytes for c in loop_ops] == [per_layer]
    assert grad_bytes <= total <= grad_bytes + 64
    assert len(data_ops) <= 4


def test_tp4_parameter_bytes_per_device(tp4):
    state, _ = tp4
    model = state.model
    sharded = replicated = 0
    for x, is_sharded in _tp_leaves(model):
        if is_sharded:
            sharded += x.size * 4
        else:
            replicated += x.size * 4
    expected = sharded / 4 + replicated
    measured = bytes_per_device(model)  # from the placed arrays' shards
    assert abs(measured - expected) <= 0.05 * expected
    assert sharded > 10 * replicated  # the check is about the big weights


# ----------------------------------------------------------------------------
# Bad input


def test_heads_not_divisible_by_model_size():
    config = GPTConfig.preset("tiny", n_layer=1)  # 2 heads
    abstract = eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))
    with pytest.raises(tx.PlanError) as info:
        gpt_plans.tp().validate(_mesh(1, 4), abstract)
    err = info.value
    assert err.path == "GPT.blocks.w_qkv"
    assert "heads" in str(err) and "size 2" in str(err)
    assert err.suggestion and "divides 2" in err.suggestion


def test_tp_rule_for_missing_logical_axis_is_an_error():
    abstract = eqx.filter_eval_shape(lambda k: GPT(PARITY, key=k), jax.random.key(0))
    rules = {"heads": "model", "mlp": "model", "vocab": "model", "hidden": "model"}
    plan = tx.Plan(tp=tx.TP("model", rules=rules))
    with pytest.raises(tx.PlanError, match="Expected TP rule `hidden`") as info:
        plan.validate(_mesh(1, 4), abstract)
    assert info.value.path == "Plan.tp.rules"
    tx.Plan(tp=plan.tp, allow_unused=("hidden",)).validate(_mesh(1, 4), abstract)


def test_tp_plan_on_mesh_without_model_axis():
    mesh = tx.make_mesh(jax.devices()[:4], data=4)
    with pytest.raises(tx.PlanError, match="`model`") as info:
        tx.make_train_step(gpt_loss, optax.sgd(0.1), gpt_plans.tp(), mesh)
    assert "make_mesh" in info.value.suggestion


def test_plan_for_matches_named_plans():
    chosen = gpt_plans.plan_for(dp_size=2, tp_size=4)
    named = gpt_plans.dp_tp()
    assert chosen.logical_rules() == named.logical_rules()
    assert chosen.data_axes == named.data_axes == ("data",)
