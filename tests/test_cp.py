"""Context parallelism (CP) and sequence parallelism (SP) for the reference models.

Parity: the loss and every gradient of the GPT and the Llama, causal, in fp32, under
CP=2/4/8, DP x CP, TP x CP (ring and all-gather attention), TP=4 with sequence
parallelism and DP x SP x CP (the Llama), and of the GPT under FSDP x CP, FSDP x TP x
CP and FSDP x SP x CP, equal one device's to <= 1e-5 (max |difference| / max
|reference|).

Communication, from the compiled, optimized HLO: under CP each layer's
collective-permutes carry exactly the analytic ring volume (keys and values once
around the ring forward; once more plus their gradients home backward), and no
activation collective is as large as the full-sequence activations. Under SP each
layer's TP all-reduces are reduce-scatter + all-gather pairs of 1/TP the activation,
forward and backward (`test_sp_collectives`).

Memory: the compiled step's temporary bytes per device at CP=4 are <= 0.3x CP=1's at
the same global context.
"""

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_gpt_parallel import _batch, _random_gpt
from test_llama import _random_llama

import titanax as tx
from models import llama_plans
from models.gpt import GPT, GPTConfig, gpt_loss
from models.llama import LlamaConfig, llama_loss
from titanax._explain import bytes_per_device
from titanax._hlo import collectives
from titanax.parallel._ring_attention import ring_traffic_bytes

# T = 32 splits into 2 x 8 zigzag chunks of 2 positions at CP=8. Eight query heads
# (four key/value heads for the Llama) so TP=4 keeps whole heads; biases on, so
# every kind of parameter has a gradient to compare.
GPT_CONFIG = GPTConfig.preset(
    "tiny", n_layer=2, n_head=8, n_embd=64, vocab_size=64, bias=True, block_size=32
)
LLAMA_CONFIG = LlamaConfig.preset(
    "tiny", n_head=8, n_kv_head=4, n_embd=32, mlp_size=64, block_size=32
)
ROWS = 4  # global batch: DP=2 gets 2 rows each

# This file compiles ~20 programs on a 2-core CPU. XLA's LLVM optimisation level
# changes only the speed of the generated CPU code, not the optimized, partitioned HLO
# (its collectives and their operands), so they are compiled at level 0: ~40% faster.
FAST = {"xla_backend_optimization_level": 0}


def _tp_rules(llama):
    """TP's rules: the Llama's also split `kv_heads`; None is TP's default."""
    return {n: "model" for n in llama_plans.TP_RULES} if llama else None


def _plan(name, *, attention: Any = "ring", llama=False):
    """The plan of one parity case, by name."""
    cp = tx.CP("context", attention=attention)
    rules = _tp_rules(llama)
    sp = tx.TP("model", rules, sequence_parallel=True)
    return {
        "cp": tx.Plan(cp=cp),
        "dp_cp": tx.Plan(dp=tx.DP("data"), cp=cp),
        "tp_cp": tx.Plan(tp=tx.TP("model", rules), cp=cp),
        "fsdp_cp": tx.Plan(fsdp=tx.FSDP("data"), cp=cp),
        "fsdp_tp_cp": tx.Plan(fsdp=tx.FSDP("data"), tp=tx.TP("model", rules), cp=cp),
        "sp": tx.Plan(tp=sp),
        # SP within CP: the sequence split over `context`, then over `model`.
        "dp_sp_cp": tx.Plan(dp=tx.DP("data"), tp=sp, cp=cp),
        "fsdp_sp_cp": tx.Plan(fsdp=tx.FSDP("data"), tp=sp, cp=cp),
    }[name]


MODELS = {
    "gpt": (GPT_CONFIG, _random_gpt, gpt_loss),
    "llama": (LLAMA_CONFIG, _random_llama, llama_loss),
}


def _with_layout(config, plan, mesh):
    return dataclasses.replace(config, layout=tx.Activations(plan, mesh))


def _loss_and_grads(model, batch, loss_fn, plan, mesh, compiler_options=FAST):
    model, batch = tx.shard(model, plan, mesh), tx.put_batch(batch, plan, mesh)
    value_and_grad = jax.jit(jax.value_and_grad(lambda m, b: loss_fn(m, b)[0]))
    compiled = value_and_grad.lower(model, batch).compile(compiler_options)
    loss, grads = compiled(model, batch)
    return float(loss), grads


@functools.cache
def _reference(name):
    """(loss, gradients) of the model on one device, without a layout."""
    config, make, loss_fn = MODELS[name]
    batch = _batch(config, ROWS)
    mesh = tx.make_mesh(jax.devices()[:1], data=1)
    return _loss_and_grads(make(config), batch, loss_fn, tx.Plan(), mesh)


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request):
    """(name, (loss, gradients)) of the model on one device, without a layout."""
    return request.param, _reference(request.param)


def _max_diffs(grads, ref_grads):
    """(max abs difference, max relative difference) over every gradient leaf."""
    worst_abs = worst_rel = 0.0
    paths = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    got = jax.tree.leaves(grads)
    assert len(got) == len(paths)
    for (path, want), have in zip(paths, got, strict=True):
        name = jax.tree_util.keystr(path)
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        assert have.shape == want.shape, name
        diff = float(np.max(np.abs(have - want)))
        rel = diff / max(float(np.max(np.abs(want))), 1e-30)
        assert rel <= 1e-5, (name, rel, diff)
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    return worst_abs, worst_rel


# (plan name, mesh axes, CP attention): every combination the issue names, with the
# ring and the all-gather variants spread over them to keep the compile count down.
CASES = {
    "gpt": [
        ("cp", {"context": 2}, "ring"),
        ("cp", {"context": 4}, "ring"),
        ("cp", {"context": 4}, "all_gather"),
        ("cp", {"context": 8}, "ring"),
        ("dp_cp", {"data": 2, "context": 4}, "all_gather"),
        ("tp_cp", {"model": 2, "context": 4}, "ring"),
        ("sp", {"model": 4}, None),
    ],
    "llama": [
        ("cp", {"context": 2}, "all_gather"),
        ("cp", {"context": 4}, "ring"),
        ("cp", {"context": 8}, "ring"),
        ("dp_cp", {"data": 2, "context": 4}, "ring"),
        ("tp_cp", {"model": 2, "context": 4}, "all_gather"),
        ("sp", {"model": 4}, None),
        ("dp_sp_cp", {"data": 2, "model": 2, "context": 2}, "all_gather"),
    ],
}


def test_parity_with_one_device(reference):
    name, (ref_loss, ref_grads) = reference
    config, make, loss_fn = MODELS[name]
    batch = _batch(config, ROWS)
    report = []
    for plan_name, axes, attention in CASES[name]:
        plan = _plan(plan_name, attention=attention or "ring", llama=name == "llama")
        devices = jax.devices()[: int(np.prod(list(axes.values())))]
        mesh = tx.make_mesh(devices, **axes)
        model = make(_with_layout(config, plan, mesh))
        loss, grads = _loss_and_grads(model, batch, loss_fn, plan, mesh)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (plan_name, axes)
        worst_abs, worst_rel = _max_diffs(grads, ref_grads)
        report.append((plan_name, axes, attention, loss - ref_loss, worst_abs))
    # Shown with `pytest -s`: the measured differences.
    for row in report:
        print(name, *row)


# FSDP shards the parameters over `data` (gathered per use) while CP splits the
# sequence over `context`; with TP too, each of the three axes has size 2 (and with
# sequence parallelism the sequence is split over `context`, then `model`).
FSDP_CASES = [
    ("fsdp_cp", {"data": 2, "context": 4}, "ring"),
    ("fsdp_tp_cp", {"data": 2, "model": 2, "context": 2}, "all_gather"),
    ("fsdp_sp_cp", {"data": 2, "model": 2, "context": 2}, "ring"),
]


@pytest.mark.parametrize("plan_name, axes, attention", FSDP_CASES)
def test_fsdp_cp_parity_with_one_device(plan_name, axes, attention):
    ref_loss, ref_grads = _reference("gpt")
    config, make, loss_fn = MODELS["gpt"]
    plan = _plan(plan_name, attention=attention)
    mesh = tx.make_mesh(jax.devices()[: int(np.prod(list(axes.values())))], **axes)
    model = make(_with_layout(config, plan, mesh))
    specs = jax.tree.leaves(
        plan.partition_specs(model, mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    # FSDP really shards: the embeddings and every stacked block weight on `data`.
    assert sum("data" in tuple(spec) for spec in specs) >= 6, specs
    loss, grads = _loss_and_grads(model, _batch(config, ROWS), loss_fn, plan, mesh)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    worst_abs, worst_rel = _max_diffs(grads, ref_grads)
    print(plan_name, axes, attention, loss - ref_loss, worst_abs, worst_rel)


def test_causal_mask_under_context_parallelism():
    # Changing the last token must leave every earlier position's logits unchanged
    # (ring order: the last token lives on device 0's second chunk).
    plan = _plan("cp")
    mesh = tx.make_mesh(jax.devices()[:4], context=4)
    config = _with_layout(GPT_CONFIG, plan, mesh)
    model = tx.shard(_random_gpt(config), plan, mesh)
    x = _batch(config, 2)["x"]
    y = x.copy()
    y[:, -1] = (y[:, -1] + 1) % config.vocab_size
    forward = jax.jit(lambda m, t: m(t))
    a = np.asarray(forward(model, tx.put_batch(x, plan, mesh)))
    b = np.asarray(forward(model, tx.put_batch(y, plan, mesh)))
    assert np.max(np.abs(a[:, :-1] - b[:, :-1])) == 0.0
    assert np.max(np.abs(a[:, -1] - b[:, -1])) > 1e-3


# ----------------------------------------------------------------------------
# Communication: a scanned stack (`unroll=False`), so each layer's collectives sit
# in the forward and backward loop bodies, run n_layer times.

HLO_CONFIG = dataclasses.replace(GPT_CONFIG, n_layer=2, block_size=128, unroll=False)
HLO_ROWS = 2


def _compiled_hlo(plan, axes, config=HLO_CONFIG):
    devices = jax.devices()[: int(np.prod(list(axes.values())))]
    mesh = tx.make_mesh(devices, **axes)
    config = _with_layout(config, plan, mesh)
    step = tx.make_train_step(gpt_loss, optax.sgd(1.0), plan, mesh)
    state = step.init(_random_gpt(config), 0)
    compiled = step.lower(state, _batch(config, HLO_ROWS)).compile(FAST)
    return state, collectives(compiled.as_text(), mesh)


def _full_activation_bytes(config=HLO_CONFIG, rows=HLO_ROWS):
    return rows * config.block_size * config.n_embd * 4  # one (B, T, C) in fp32


def test_cp_ring_traffic_equals_analytic_volume():
    n = 4
    state, ops = _compiled_hlo(_plan("cp"), {"context": n})
    c = HLO_CONFIG
    # S: one device's keys and values together, (B, T/N, heads, head_dim) each.
    kv_bytes = 2 * HLO_ROWS * (c.block_size // n) * c.n_embd * 4
    permutes = [op for op in ops if op.kind == "collective-permute"]
    bodies: dict[str, list[int]] = {}
    for op in permutes:
        if op.in_loop:
            bodies.setdefault(op.computation, []).append(op.bytes)
    # Forward body: keys and values once around the ring, (N-1) S. Backward body:
    # once more, (N-1) S, plus their gradients (fp32) all the way home, N S.
    per_body = sorted(sum(b) for b in bodies.values())
    assert per_body == [(n - 1) * kv_bytes, (2 * n - 1) * kv_bytes], per_body
    assert sum(per_body) == ring_traffic_bytes(kv_bytes, n) == 10 * kv_bytes
    # Outside the layers: the zigzag reorder of the tokens (in) and of the last
    # hidden states (out, and its gradient), half a device's block per permute.
    outside = [op.bytes for op in permutes if not op.in_loop]
    half_block = _full_activation_bytes() // n // 2
    assert sorted(outside) == sorted(
        [HLO_ROWS * c.block_size // n // 2 * 4] * 2 + [half_block] * 4
    ), outside
    # No activation collective near the full sequence's size; the all-reduces over
    # `context` are the gradients' (replicated parameters), once per step.
    full = _full_activation_bytes()
    assert max(op.bytes for op in ops if op.kind != "all-reduce") * n <= full
    reduces = [op for op in ops if op.kind == "all-reduce"]
    assert all(op.axes == ("context",) for op in reduces)
    total = sum(op.bytes * (c.n_layer if op.in_loop else 1) for op in reduces)
    grads = bytes_per_device(state.model)
    assert grads <= total <= grads + 64, (grads, total)
    assert not [op for op in ops if op.kind in ("all-gather", "all-to-all")]


def test_cp_all_gather_traffic():
    n = 4
    _, ops = _compiled_hlo(_plan("cp", attention="all_gather"), {"context": n})
    c = HLO_CONFIG
    kv_bytes = 2 * HLO_ROWS * (c.block_size // n) * c.n_embd * 4
    gathers = [op for op in ops if op.kind == "all-gather"]
    scatters = [op for op in ops if op.kind == "reduce-scatter"]
    # Per layer: the keys and values gathered forward and again backward (the
    # backward recomputes instead of keeping them), and their gradients
    # reduce-scattered home: the whole sequence's keys and values, N S bytes each.
    assert all(op.in_loop for op in gathers + scatters)
    assert sum(op.bytes for op in gathers) == 2 * n * kv_bytes
    assert sum(op.bytes for op in scatters) == kv_bytes  # the result: 1/N
    assert not [op for op in ops if op.kind == "collective-permute" and op.in_loop]


def test_sp_collectives():
    """TP=4 with sequence parallelism: each layer's TP collectives are Megatron-SP's
    reduce-scatter + all-gather pairs of 1/TP the activation.

    Without SP each layer holds 2 all-reduces over `model` of the whole (B, T, C)
    activation forward and 2 backward (`test_gpt_parallel`). Under SP the layout's
    `project_in` and `project_out` write the collectives out: forward, the inputs
    of attention and the MLP are all-gathered (each device contributes its 1/TP of
    the sequence) and their row-parallel outputs reduce-scattered (each device
    receives 1/TP); backward, the transposes: the outputs' gradients all-gathered,
    the inputs' gradients reduce-scattered. Left to XLA:CPU's partitioner (its pass
    pipeline has no reduce-scatter creator) each reduce-scatter was an all-reduce
    of the whole activation followed by a dynamic slice.
    """
    n = 4
    _, ops = _compiled_hlo(_plan("sp"), {"model": n})
    full = _full_activation_bytes()
    bodies: dict[str, list] = {}
    for op in ops:
        if op.in_loop:
            bodies.setdefault(op.computation, []).append(op)
    assert all(op.axes == ("model",) for body in bodies.values() for op in body)

    def sizes(body):
        # (kind, bytes of the 1/TP side per device): an all-gather's operand (its
        # result, the whole activation, over TP), a reduce-scatter's result.
        return sorted(
            (op.kind, op.bytes // n if op.kind == "all-gather" else op.bytes)
            for op in body
        )

    # Per layer, forward and backward (the two scan bodies) alike: 2 all-gathers
    # and 2 reduce-scatters of full / TP, and no all-reduce of an activation. The
    # backward body's one all-reduce is the gradients of the 6 weights replicated
    # over `model` (2 norms' scales and biases, 2 output biases: C floats each),
    # summed over the sequence shards.
    pairs = [("all-gather", full // n)] * 2 + [("reduce-scatter", full // n)] * 2
    grads = ("all-reduce", 6 * HLO_CONFIG.n_embd * 4)
    assert sorted(sizes(b) for b in bodies.values()) == [
        sorted([*pairs, grads]),
        pairs,
    ], [sizes(b) for b in bodies.values()]


# ----------------------------------------------------------------------------
# Bad input: typed errors at validation or trace time, before anything compiles


def _abstract_gpt(config):
    return eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))


def test_cp_axis_missing_from_mesh():
    plan = _plan("cp")
    mesh = tx.make_mesh(jax.devices()[:4], data=4)
    with pytest.raises(tx.PlanError, match="uses mesh axis `context`") as info:
        tx.Activations(plan, mesh)
    assert "Add `context` to the mesh" in info.value.suggestion
    with pytest.raises(tx.PlanError, match="uses mesh axis `context`"):
        plan.validate(mesh, _abstract_gpt(GPT_CONFIG))


def test_seq_not_divisible_by_twice_the_ring():
    plan = _plan("cp")
    mesh = tx.make_mesh(jax.devices()[:4], context=4)
    config = _with_layout(dataclasses.replace(GPT_CONFIG, block_size=36), plan, mesh)
    model = _abstract_gpt(config)
    tokens = jax.ShapeDtypeStruct((2, 36), jnp.int32)
    with pytest.raises(tx.ShardingError, match="divisible by 8") as info:
        jax.eval_shape(lambda m, t: m(t), model, tokens)  # traced, never compiled
    assert "got 36" in str(info.value)
    assert "multiple of 8" in info.value.suggestion


def test_cp_with_a_model_without_the_layout():
    plan = _plan("cp")
    mesh = tx.make_mesh(jax.devices()[:4], context=4)
    with pytest.raises(tx.PlanError, match="given no activation layout") as info:
        plan.validate(mesh, _abstract_gpt(GPT_CONFIG))
    assert info.value.path == "GPT.config.layout"
    assert "layout=tx.Activations(plan, mesh)" in info.value.suggestion
    with pytest.raises(tx.PlanError, match="given no activation layout"):
        tx.shard(_random_gpt(GPT_CONFIG), plan, mesh)  # and so every entry point
    # A layout built for another mesh is caught the same way.
    other = tx.make_mesh(jax.devices()[:2], context=2)
    model = _abstract_gpt(_with_layout(GPT_CONFIG, plan, other))
    with pytest.raises(tx.PlanError, match=r"mesh \{'context': 2\}"):
        plan.validate(mesh, model)


def test_unknown_activation_axis():
    plan = _plan("cp")
    layout = tx.Activations(plan, tx.make_mesh(jax.devices()[:4], context=4))
    x = jax.ShapeDtypeStruct((2, 8, 4), jnp.float32)
    with pytest.raises(tx.ShardingError, match="got `sqe`.*Did you mean `seq`"):
        jax.eval_shape(lambda x: layout.constrain(x, ("batch", "sqe", "embed")), x)


def test_sp_projections_bad_input():
    layout = tx.Activations(_plan("sp"), tx.make_mesh(jax.devices()[:4], model=4))
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    y, w_out = f32((2, 8, 8, 4)), f32((8, 8, 32))  # (B, T, heads, head_dim)
    with pytest.raises(tx.ShardingError, match=r"leading dims equal the last dims"):
        jax.eval_shape(
            lambda y, w: layout.project_out(
                y,
                w,
                names=("batch", "seq", "heads", "head_dim"),
                w_names=("heads", "head_dim", "embed"),
            ),
            y,
            w_out,
        )
    x, w_in = f32((2, 8, 32)), f32((32, 64))  # (B, T, C), (C, mlp)
    with pytest.raises(tx.ShardingError, match="one tuple of logical axis names per"):
        jax.eval_shape(
            lambda x, w: layout.project_in(x, [w, w], w_names=[("embed", "mlp")]),
            x,
            w_in,
        )
    with pytest.raises(tx.ShardingError, match=r"`seq` \(dim 1\) to be divisible by 4"):
        jax.eval_shape(
            lambda x, w: layout.project_in(x, [w], w_names=[("embed", "mlp")]),
            f32((2, 6, 32)),
            w_in,
        )


# ----------------------------------------------------------------------------
# Memory


def test_cp4_temp_bytes_at_most_0_3_of_one_device():
    # Same global context (T = 512, one row). XLA's scratch buffer holds the
    # activations kept for the backward pass and every intermediate (at CP=1 the
    # (heads, T, T) attention scores dominate).
    config = dataclasses.replace(GPT_CONFIG, block_size=512, unroll=False)
    batch = _batch(config, 1)

    def temp_bytes(plan, mesh, config):
        model = tx.shard(_random_gpt(config), plan, mesh)
        placed = tx.put_batch(batch, plan, mesh)
        grad = jax.jit(jax.grad(lambda m, b: gpt_loss(m, b)[0]))
        compiled = grad.lower(model, placed).compile(FAST)
        return compiled.memory_analysis().temp_size_in_bytes

    one = temp_bytes(tx.Plan(), tx.make_mesh(jax.devices()[:1], data=1), config)
    plan = _plan("cp")
    mesh = tx.make_mesh(jax.devices()[:4], context=4)
    four = temp_bytes(plan, mesh, _with_layout(config, plan, mesh))
    print(f"temp bytes per device: CP=1 {one}, CP=4 {four}, ratio {four / one:.3f}")
    assert four <= 0.3 * one, (four, one)
