"""The GPT (and the toy stack) pipelined: parity with the unpipelined model.

Parity: the loss, the accuracy and every gradient of the pipelined GPT under GPipe
and 1F1B equal those of the unpipelined model on one device (fp32, ≤ 1e-5 relative
per array, as max |Δ| / max |reference|) for S ∈ {2, 4} stages and M ∈ {S, 2S, 4S}
microbatches, and under DP×PP, TP×PP and DP×TP×PP. The Trainer's AdamW steps under PP
(and its `evaluate`) match the single-device run.

The GPT is `tiny` with 4 layers (so 4 stages get one block each), 4 heads (so TP=4
gets one head each), width 16 and a vocabulary of 32, biases on so that every kind
of parameter has a gradient to compare; its weights are drawn in numpy (building it
with JAX's PRNG costs a compile). Each case compiles one pipelined step (~3 s on CPU).
"""

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_pipeline import TOY_STAGE, Toy, _toy_batch, _toy_loss

import titanax as tx
from models import gpt_plans
from models.gpt import GPT, GPTConfig, gpt_loss
from titanax.parallel.pipeline import pipeline_value_and_grad

RTOL = 1e-5
CONFIG = GPTConfig.preset(
    "tiny", n_layer=4, n_head=4, n_embd=16, vocab_size=32, block_size=8, bias=True
)
ROWS = 16  # global batch: 4 data shards x 4 microbatches, or 16 microbatches
N_ARRAYS = 17  # arrays of a GPT with biases and untied embeddings
TP_AXES = {"heads", "mlp", "vocab"}  # the logical axes TP maps to `model`


def _random_gpt(config, seed=0):
    """A GPT with random weights drawn in numpy: norm scales near 1, everything else
    ~N(0, 0.05) (biases too, so that their gradients are not trivial)."""
    abstract = eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    arrays = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        x = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        arrays.append(x + 1 if "scale" in jax.tree_util.keystr(path) else x)
    return eqx.tree_at(lambda m: jax.tree.leaves(m), abstract, arrays)


def _batch(config, rows, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (rows, config.block_size + 1))
    x = x.astype(np.int32)
    return {"x": x[:, :-1], "y": x[:, 1:]}


@pytest.fixture(scope="module")
def reference():
    """The GPT, a batch, and the unpipelined loss, metrics and gradients on one
    device."""
    model, batch = _random_gpt(CONFIG), _batch(CONFIG, ROWS)
    value_and_grad = eqx.filter_jit(
        eqx.filter_value_and_grad(lambda m, b: gpt_loss(m, b), has_aux=True)
    )
    (loss, metrics), grads = value_and_grad(model, batch)
    return model, batch, (float(loss), float(metrics["accuracy"]), grads)


def _mesh(data=1, model=1, pipe=1):
    devices = jax.devices()[: data * model * pipe]
    return tx.make_mesh(devices, data=data, model=model, pipe=pipe)


def _pipelined(stage, model, batch, plan, mesh):
    def run(m, b):
        return pipeline_value_and_grad(stage, m, b, None, plan=plan, mesh=mesh)

    return jax.jit(run)(tx.shard(model, plan, mesh), batch)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _assert_grads_close(grads, want, n_arrays):
    got_leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(grads, eqx.is_array))
    want_leaves = jax.tree.leaves(eqx.filter(want, eqx.is_array))
    assert len(got_leaves[0]) == len(want_leaves) == n_arrays
    for (path, got), w in zip(got_leaves[0], want_leaves, strict=True):
        name = jax.tree_util.keystr(path)
        assert got.shape == w.shape, name
        rel = _rel_err(got, w)
        assert rel <= RTOL, f"{name}: relative error {rel:.2e}"


def _assert_gpt_sharding(tree, tp=False):
    """Blocks split over `pipe` on their `layers` dim; with TP, the `heads`, `mlp`
    and `vocab` dims over `model`; every other dim replicated."""
    arrays = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    names = _logical_names(tree)
    for (path, x), dims in zip(arrays, names, strict=True):
        want = tuple(
            "pipe" if d == "layers" else "model" if tp and d in TP_AXES else None
            for d in dims
        )
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        assert spec == want, (jax.tree_util.keystr(path), spec, want)


def _logical_names(tree):
    specs = jax.tree.leaves(
        tx.logical_axes(tree), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return [tuple(p) for p in specs]


def test_sharding_check_sees_every_array(reference):
    model, _, _ = reference
    names = _logical_names(model)
    assert len(names) == N_ARRAYS
    assert names[0] == ("vocab", "embed")  # wte: the order matches the arrays'


# ----------------------------------------------------------------------------
# GPT: both schedules, S in {2, 4}, M in {S, 2S, 4S}

# Each schedule at both stage counts, with as many microbatches as stages (no
# steady state) and with 4x as many. The toy model in test_pipeline.py runs the
# full grid (2 and 4 stages x 1, 2, 4 microbatches per stage x both schedules);
# on the GPT each case compiles for ~10 s.
GRID = [
    pytest.param(s, k * s, schedule, id=f"pp{s}_m{k * s}_{schedule}")
    for s, k, schedule in (
        (2, 1, "gpipe"),
        (2, 4, "1f1b"),
        (4, 1, "1f1b"),
        (4, 4, "gpipe"),
    )
]


@pytest.mark.parametrize("stages, microbatches, schedule", GRID)
def test_gpt_parity(reference, stages, microbatches, schedule):
    model, batch, (want_loss, want_accuracy, want) = reference
    plan = gpt_plans.plan_for(
        pp_size=stages, microbatches=microbatches, schedule=schedule
    )
    assert plan.pp == tx.PP("pipe", microbatches=microbatches, schedule=schedule)
    loss, metrics, grads = _pipelined(
        gpt_plans.STAGE, model, batch, plan, _mesh(pipe=stages)
    )
    assert abs(float(loss) - want_loss) <= RTOL * abs(want_loss)
    # All labels are valid, so the mean of the microbatches' accuracies is the
    # batch's; allow one argmax decided differently by rounding.
    assert abs(float(metrics["accuracy"]) - want_accuracy) <= 1 / batch["y"].size
    _assert_grads_close(grads, want, N_ARRAYS)
    _assert_gpt_sharding(grads)


# ----------------------------------------------------------------------------
# GPT: DP×PP, TP×PP and DP×TP×PP


@pytest.mark.parametrize(
    "data, model_size, pipe, microbatches, schedule",
    [
        pytest.param(2, 1, 4, 8, "gpipe", id="dp2_pp4_m8_gpipe"),
        pytest.param(1, 2, 4, 8, "1f1b", id="tp2_pp4_m8_1f1b"),
        pytest.param(1, 2, 4, 4, "gpipe", id="tp2_pp4_m4_gpipe"),
        pytest.param(1, 4, 2, 4, "1f1b", id="tp4_pp2_m4_1f1b"),
        pytest.param(1, 4, 2, 8, "gpipe", id="tp4_pp2_m8_gpipe"),
        pytest.param(2, 2, 2, 4, "1f1b", id="dp2_tp2_pp2_m4_1f1b"),
    ],
)
def test_gpt_parity_composed(reference, data, model_size, pipe, microbatches, schedule):
    model, batch, (want_loss, want_accuracy, want) = reference
    plan = gpt_plans.plan_for(
        dp_size=data,
        tp_size=model_size,
        pp_size=pipe,
        microbatches=microbatches,
        schedule=schedule,
    )
    mesh = _mesh(data, model_size, pipe)
    loss, metrics, grads = _pipelined(gpt_plans.STAGE, model, batch, plan, mesh)
    assert abs(float(loss) - want_loss) <= RTOL * abs(want_loss)
    assert abs(float(metrics["accuracy"]) - want_accuracy) <= 1 / batch["y"].size
    _assert_grads_close(grads, want, N_ARRAYS)
    _assert_gpt_sharding(grads, tp=model_size > 1)
    if model_size > 1:
        # Spelled out once: QKV's heads and MLP-up's hidden dim over `model`.
        assert tuple(grads.blocks.w_qkv.sharding.spec)[:3] == ("pipe", None, "model")
        assert tuple(grads.blocks.w_mlp_in.sharding.spec) == ("pipe", None, "model")
        shard = grads.blocks.w_mlp_in.addressable_shards[0].data
        assert shard.shape == (4 // pipe, 16, 64 // model_size)


# ----------------------------------------------------------------------------
# The toy stack under TP×PP (its layers' `mlp` dim is tensor-parallel)


@pytest.mark.parametrize(
    "model_size, pipe, schedule",
    [
        pytest.param(2, 4, "gpipe", id="tp2_pp4_gpipe"),
        pytest.param(2, 4, "1f1b", id="tp2_pp4_1f1b"),
        pytest.param(4, 2, "gpipe", id="tp4_pp2_gpipe"),
        pytest.param(4, 2, "1f1b", id="tp4_pp2_1f1b"),
    ],
)
def test_toy_parity_tp_x_pp(model_size, pipe, schedule):
    model, batch = Toy(jax.random.key(0)), _toy_batch(32)
    (want_loss, want_metrics), want = eqx.filter_value_and_grad(
        _toy_loss, has_aux=True
    )(model, batch)
    pp = tx.PP("pipe", microbatches=2 * pipe, schedule=schedule)
    plan = tx.Plan(tp=tx.TP("model"), pp=pp)
    mesh = _mesh(model=model_size, pipe=pipe)
    loss, metrics, grads = _pipelined(TOY_STAGE, model, batch, plan, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    np.testing.assert_allclose(metrics["mae"], want_metrics["mae"], rtol=RTOL)
    _assert_grads_close(grads, want, 4)
    assert tuple(grads.layers.w.sharding.spec) == ("pipe", None, "model")
    assert tuple(grads.layers.v.sharding.spec)[:2] == ("pipe", "model")
    assert grads.layers.w.addressable_shards[0].data.shape == (
        8 // pipe,
        8,
        16 // model_size,
    )


# ----------------------------------------------------------------------------
# The Trainer: AdamW steps under PP equal the unpipelined single-device run


LR, STEPS = 1e-2, 4


def _train(model, batch, plan, mesh, stage):
    losses = []
    trainer = tx.Trainer(
        model,
        plan,
        optimizer=tx.optim.adamw(LR, weight_decay=0.1, clip_norm=1.0),
        loss=gpt_loss,
        mesh=mesh,
        log_every=1,
        hooks=[lambda step, metrics, trainer: losses.append(metrics["loss"])],
        stage=stage,
    )
    state = trainer.fit([batch] * STEPS, steps=STEPS)  # one batch: the loss falls
    return losses, state.model, trainer.evaluate([batch])


def _l2_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def single_device_run(reference):
    model, batch, _ = reference
    return _train(model, batch, tx.Plan(), _mesh(), None)


@pytest.mark.parametrize(
    "data, model_size, pipe, schedule",
    [
        pytest.param(1, 1, 2, "1f1b", id="pp2_1f1b"),
        pytest.param(2, 2, 2, "gpipe", id="dp2_tp2_pp2_gpipe"),
    ],
)
def test_trainer_adamw_matches_single_device(
    reference, single_device_run, data, model_size, pipe, schedule
):
    model, batch, _ = reference
    ref_losses, ref_model, ref_eval = single_device_run
    plan = gpt_plans.plan_for(
        dp_size=data, tp_size=model_size, pp_size=pipe, schedule=schedule
    )
    assert plan.pp is not None and plan.pp.microbatches == 2 * pipe
    mesh = _mesh(data, model_size, pipe)
    losses, trained, evaluated = _train(model, batch, plan, mesh, gpt_plans.STAGE)

    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert ref_losses[3] < ref_losses[2] < ref_losses[1] < ref_losses[0]
    # `evaluate` runs the plain loss (no pipeline schedule) on the split model.
    np.testing.assert_allclose(evaluated["loss"], ref_eval["loss"], rtol=RTOL)
    assert evaluated["loss"] < ref_losses[-1]
    _assert_gpt_sharding(trained, tp=model_size > 1)

    # Every array equals the reference's, but for the k bias: its gradient is zero in
    # exact arithmetic (softmax ignores a shift shared by all keys), and Adam turns
    # rounding noise in it into steps of up to lr each.
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(trained)[0],
        jax.tree.leaves(ref_model),
        strict=True,
    ):
        got, want = np.asarray(got), np.asarray(want)
        name = jax.tree_util.keystr(path)
        if name == ".blocks.b_qkv":  # (layers, heads, 3, head_dim)
            np.testing.assert_allclose(got[:, :, 1], want[:, :, 1], atol=STEPS * LR)
            got, want = got[:, :, [0, 2]], want[:, :, [0, 2]]
        assert _l2_rel(got, want) <= RTOL, (name, _l2_rel(got, want))


def test_plan_for_pipeline_options():
    plan = gpt_plans.plan_for(dp_size=2, tp_size=2, pp_size=4)
    assert plan.pp == tx.PP("pipe", microbatches=8, schedule="1f1b")
    assert plan.mesh_axes == ("data", "model", "pipe")
    assert gpt_plans.plan_for(tp_size=2).pp is None
    with pytest.raises(tx.PlanError, match="needs a pipeline"):
        gpt_plans.plan_for(microbatches=4)
    with pytest.raises(tx.PlanError, match="does not compose with FSDP"):
        gpt_plans.plan_for(fsdp_size=2, pp_size=2)
    with pytest.raises(tx.PipelineError, match="expects .gpipe. or .1f1b."):
        gpt_plans.pp(2, schedule="zb")  # pyright: ignore[reportArgumentType]
