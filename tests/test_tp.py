"""Megatron TP for a model we do not own, named from outside its forward code.

`Foreign` is assembled from `eqx.nn.Embedding`, `eqx.nn.MultiheadAttention`,
`eqx.nn.LayerNorm` and `eqx.nn.Linear`, with the forward code anyone would write.
Its TP layout comes only from per-use `tx.field(axes={...})` dicts on its fields (the
same `eqx.nn.Linear` is column-parallel as `up`, row-parallel as `down`) and from a
plan path rule (the LM head). Under TP=4 its loss and every gradient equal one
device's, and the compiled step holds Megatron's all-reduces and nothing bigger.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from models.gpt import cross_entropy
from titanax._hlo import collectives

VOCAB, EMBED, HEADS, MLP, T, B = 256, 64, 8, 256, 16, 8

COLUMN = ("heads", "embed")  # an eqx.nn.Linear weight is (out, in)
ROW = ("embed", "heads")


class Foreign(eqx.Module):
    """One pre-LN transformer block with an embedding and an LM head."""

    embed: eqx.nn.Embedding  # built-in default: ("vocab", "embed")
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention = tx.field(
        axes={
            "query_proj.weight": COLUMN,
            "key_proj.weight": COLUMN,
            "value_proj.weight": COLUMN,
            "output_proj.weight": ROW,
        }
    )
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear = tx.field(axes={"weight": ("mlp", "embed"), "bias": ("mlp",)})
    down: eqx.nn.Linear = tx.field(axes={"weight": ("embed", "mlp"), "bias": (None,)})
    head: eqx.nn.Linear  # named by the plan's path rule below

    def __init__(self, key):
        k = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(VOCAB, EMBED, key=k[0])
        self.ln1 = eqx.nn.LayerNorm(EMBED)
        self.attn = eqx.nn.MultiheadAttention(HEADS, EMBED, key=k[1])
        self.ln2 = eqx.nn.LayerNorm(EMBED)
        self.up = eqx.nn.Linear(EMBED, MLP, key=k[2])
        self.down = eqx.nn.Linear(MLP, EMBED, key=k[3])
        self.head = eqx.nn.Linear(EMBED, VOCAB, use_bias=False, key=k[4])

    def __call__(self, tokens):  # (T,) int -> (T, VOCAB)
        h = jax.vmap(self.embed)(tokens)
        x = jax.vmap(self.ln1)(h)
        causal = jnp.tril(jnp.ones((len(tokens), len(tokens)), bool))
        h = h + self.attn(x, x, x, mask=causal)
        x = jax.vmap(self.ln2)(h)
        h = h + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(x)))
        return jax.vmap(self.head)(h)


def loss(model, batch, key=None):
    logits = jax.vmap(model)(batch["x"])
    return jnp.mean(cross_entropy(logits, batch["y"]))


RULES = [(r"\.head\.weight$", ("vocab", "embed"))]


def _plan(model_size):
    tp = tx.TP("model", rules={"heads": "model", "mlp": "model", "vocab": "model"})
    return tx.Plan(tp=tp if model_size > 1 else None, rules=RULES)


def _mesh(model_size):
    return tx.make_mesh(jax.devices()[:model_size], model=model_size)


def _batch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    return {"x": x[:, :-1], "y": x[:, 1:]}


def _grad_store():
    """Keeps the step's gradients in the optimizer state; parameters stay put."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )


def _step(model_size, model):
    step = tx.make_train_step(loss, _grad_store(), _plan(model_size), _mesh(model_size))
    state = step.init(model, 0)
    return step, state


@pytest.fixture(scope="module")
def foreign():
    """A `Foreign` with weights drawn in numpy (eager eqx.nn init costs seconds)."""
    abstract = eqx.filter_eval_shape(Foreign, jax.random.key(0))
    shapes, static = eqx.partition(
        abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )
    rng = np.random.default_rng(0)
    arrays = jax.tree.map(
        lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32), shapes
    )
    return eqx.combine(arrays, static)


def test_layout_comes_from_per_use_dicts_and_path_rules(foreign):
    specs = tx.shardings(foreign, _plan(4), _mesh(4))
    spec = lambda f: f(specs).spec  # noqa: E731
    assert spec(lambda m: m.embed.weight) == P("model", None)  # vocab-parallel
    for proj in ("query_proj", "key_proj", "value_proj"):
        assert getattr(specs.attn, proj).weight.spec == P("model", None)  # column
    assert spec(lambda m: m.attn.output_proj.weight) == P(None, "model")  # row
    assert spec(lambda m: m.up.weight) == P("model", None)  # column
    assert spec(lambda m: m.up.bias) == P("model")
    assert spec(lambda m: m.down.weight) == P(None, "model")  # row
    assert spec(lambda m: m.down.bias) == P(None)
    assert spec(lambda m: m.head.weight) == P("model", None)  # the path rule
    assert spec(lambda m: m.ln1.weight) == P(None)


def test_parity_and_megatron_collectives(foreign):
    batch = _batch()
    results = {}
    for size in (1, 4):
        step, state = _step(size, foreign)
        hlo = step.lower(state, batch).compile().as_text()
        state, metrics = step.step(state, batch)
        results[size] = float(metrics["loss"]), state.opt_state, hlo
    ref_loss, ref_grads, _ = results[1]
    tp_loss, tp_grads, hlo = results[4]
    assert abs(tp_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    paths = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    got = jax.tree.leaves(tp_grads)
    assert len(got) == len(paths) == 14
    for (path, want), have in zip(paths, got, strict=True):
        want, have = np.asarray(want), np.asarray(have)
        err = np.max(np.abs(have - want)) / np.max(np.abs(want))
        assert err <= 1e-5, (jax.tree_util.keystr(path), err)

    ops = collectives(hlo, _mesh(4))
    act = B * T * EMBED * 4  # one [B, T, C] activation
    reduces = [c for c in ops if c.kind == "all-reduce" and c.axes == ("model",)]
    # Activations each all-reduce carries (a combined all-reduce carries several,
    # plus scalars and [B, T] softmax statistics, which `//` drops).
    payloads = [c.bytes // act for c in reduces if c.bytes >= act]
    # Forward, one each: the vocab-parallel embedding, attention-out and MLP-down
    # (row-parallel). Backward: the inputs of MLP-up and of the head, one each, and
    # of attention THREE: `eqx.nn.MultiheadAttention` takes query, key and value as
    # separate inputs with separate projections, so each input's gradient is
    # all-reduced before they are added (XLA combines the three into one op).
    # The GPT's fused `w_qkv` needs one (tests/test_gpt_parallel.py).
    assert sorted(payloads) == [1, 1, 1, 1, 1, 3], [c.bytes for c in reduces]
    assert sum(c.bytes for c in reduces) <= 8 * act + 8 * B * T * 4
    # No weight is ever gathered, nor the logits (the loss is vocab-parallel).
    smallest_weight = EMBED * EMBED * 4
    assert all(c.bytes < smallest_weight for c in ops if c.kind != "all-reduce")
    assert max(c.bytes for c in ops) < B * T * VOCAB * 4  # 4 activations


def test_rule_for_a_missing_logical_axis_is_an_error(foreign):
    tp = tx.TP("model", rules={"mlp": "model", "ffn": "model"})
    with pytest.raises(tx.PlanError, match="Expected TP rule `ffn`") as info:
        tx.Plan(tp=tp, rules=RULES).validate(_mesh(4), foreign)
    assert 'allow_unused=("ffn",)' in (info.value.suggestion or "")
    # The opt-out keeps the rule; the layout is the one without it.
    plan = tx.Plan(tp=tp, rules=RULES, allow_unused=("ffn",))
    specs = tx.shardings(foreign, plan, _mesh(4))
    assert specs.up.weight.spec == P("model", None)
    assert specs.attn.query_proj.weight.spec == P(None, None)  # `heads` not mapped


def test_attention_heads_split_inside_a_head_is_refused():
    # 2 heads of size 16: the merged (heads*head_size) dim of 32 divides 4, but
    # TP=4 would cut each head in half. The plan checks `num_heads` itself.
    class Attn(eqx.Module):
        attn: eqx.nn.MultiheadAttention

    model = Attn(eqx.nn.MultiheadAttention(2, 32, key=jax.random.key(0)))
    mesh = tx.make_mesh(jax.devices()[:4], model=4)
    with pytest.raises(tx.PlanError, match="has 2 heads") as info:
        tx.Plan(tp=tx.TP()).validate(mesh, model)
    assert info.value.path == "Attn.attn"
    assert "divides 2" in (info.value.suggestion or "")
