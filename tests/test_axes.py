"""Logical axes: the five sources, their priority, stacking and `eqx.nn` defaults.

This module uses `from __future__ import annotations` on purpose: jaxtyping dims must
be read from string annotations (`typing.get_type_hints`), as users' modules often
have them. The models live at module level so that their annotations resolve.
"""

# One-word jaxtyping dims ("mlp") look like quoted forward references to ruff.
# ruff: noqa: UP037

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import titanax as tx
from titanax._axes import path_rule_use
from titanax._errors import ShardingError


def _abstract(fn, *args):
    """`fn(*args)` as `ShapeDtypeStruct`s: logical axes need shapes, not values, and
    tracing compiles nothing, which keeps these tests fast."""
    return eqx.filter_eval_shape(fn, *args)


def _is_spec(x):
    return isinstance(x, P)


# ------------------------------------------------------------------ jaxtyping


class Annotated(eqx.Module):
    w: Float[Array, "embed mlp"]
    maybe: Float[Array, "mlp"] | None
    numeric: Float[Array, "3 embed"]
    anonymous: Float[Array, "_ embed"]
    variadic: Float[Array, "*batch embed"]
    middle: Float[Array, "heads ... embed"]
    broadcast: Float[Array, "#seq embed"]
    plain: jax.Array
    count: int = 3


def _annotated(maybe=True):
    return Annotated(
        w=np.zeros((4, 8)),
        maybe=np.zeros(8) if maybe else None,
        numeric=np.zeros((3, 4)),
        anonymous=np.zeros((5, 4)),
        variadic=np.zeros((2, 3, 4)),
        middle=np.zeros((2, 7, 6, 4)),
        broadcast=np.zeros((1, 4)),
        plain=np.zeros((2, 2)),
    )


def test_jaxtyping_dims_under_future_annotations():
    axes = tx.logical_axes(_annotated())
    assert axes.w == P("embed", "mlp")
    assert axes.maybe == P("mlp")  # `X | None` is looked through
    assert axes.numeric == P(None, "embed")  # numeric dims are unnamed
    assert axes.anonymous == P(None, "embed")  # `_` is unnamed
    assert axes.variadic == P(None, None, "embed")  # `*batch` fills two dims, unnamed
    assert axes.middle == P("heads", None, None, "embed")  # `...` fills the middle
    assert axes.broadcast == P("seq", "embed")  # `#` marks broadcasting, still named
    assert axes.plain == P(None, None)  # no source: replicated
    assert axes.count is None  # non-arrays map to None


def test_optional_field_set_to_none():
    axes = tx.logical_axes(_annotated(maybe=False))
    assert axes.maybe is None
    assert axes.w == P("embed", "mlp")


def test_structure_matches_filtered_model():
    model = _annotated()
    axes = tx.logical_axes(model)
    want = jax.tree.structure(eqx.filter(model, eqx.is_array))
    assert jax.tree.structure(axes, is_leaf=_is_spec) == want


# ---------------------------------------------------------------- priority


class Inner(eqx.Module):
    # Three sources name `w`: the annotation, tx.field and (via Outer) a per-use dict.
    w: Float[Array, "ann_a ann_b"] = tx.field(axes=("field_a", "field_b"))
    # Annotation and tx.field: the field's metadata wins.
    v: Float[Array, "ann_v"] = tx.field(axes=("field_v",))
    # Annotation only.
    u: Float[Array, "ann_u"]


class AnnotatedLinear(eqx.nn.Linear):
    """A Linear whose annotation overrides the built-in `(out, in)` default."""

    weight: Float[Array, "ann_out ann_in"]


class Outer(eqx.Module):
    inner: Inner = tx.field(axes={"w": ("use_a", "use_b")})
    linear: eqx.nn.Linear  # built-in defaults
    column: eqx.nn.Linear = tx.field(axes={"weight": ("mlp", "embed")})
    annotated: AnnotatedLinear


def _outer(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return Outer(
        inner=Inner(w=np.zeros((2, 4)), v=np.zeros(3), u=np.zeros(5)),
        linear=eqx.nn.Linear(4, 8, key=k1),
        column=eqx.nn.Linear(4, 8, key=k2),
        annotated=AnnotatedLinear(4, 8, key=k3),
    )


def test_priority_without_rules(getkey):
    axes = tx.logical_axes(_abstract(_outer, getkey()))
    assert axes.inner.w == P("use_a", "use_b")  # per-use dict > tx.field > annotation
    assert axes.inner.v == P("field_v")  # tx.field > annotation
    assert axes.inner.u == P("ann_u")  # annotation
    assert axes.linear.weight == P("out", "in")  # eqx.nn default
    assert axes.linear.bias == P("out")
    assert axes.column.weight == P("mlp", "embed")  # per-use dict > default
    assert axes.column.bias == P("out")  # keys not in the dict keep the default
    assert axes.annotated.weight == P("ann_out", "ann_in")  # annotation > default


def test_path_rules_beat_every_source(getkey):
    rules = [
        (r"Outer\.inner\.w$", ("rule_a", "rule_b")),
        (r"\.v$", ("rule_v",)),
        (r"column\.weight", ("rule_o", "rule_i")),
        (r"annotated\.weight", (None, "rule_i")),
        (r"linear\.bias", ("rule_bias",)),
    ]
    axes = tx.logical_axes(_abstract(_outer, getkey()), rules)
    assert axes.inner.w == P("rule_a", "rule_b")
    assert axes.inner.v == P("rule_v")
    assert axes.inner.u == P("ann_u")  # no rule matches: the annotation still applies
    assert axes.column.weight == P("rule_o", "rule_i")
    assert axes.annotated.weight == P(None, "rule_i")
    assert axes.linear.bias == P("rule_bias")
    assert axes.linear.weight == P("out", "in")


def test_first_matching_rule_wins(getkey):
    rules = [(r"weight", ("first", None)), (r"linear\.weight", ("second", None))]
    axes = tx.logical_axes(_abstract(_outer, getkey()), rules)
    assert axes.linear.weight == P("first", None)


def test_plan_rules_flow_into_shardings(getkey):
    mesh = tx.make_mesh(data=2, model=4)
    plan = tx.Plan(tp=tx.TP(), rules=[(r"linear\.weight", ("mlp", None))])
    shardings = tx.shardings(_abstract(_outer, getkey()), plan, mesh)
    assert shardings.linear.weight.spec == P("model", None)
    assert shardings.column.weight.spec == P("model", None)  # per-use `mlp`
    assert shardings.linear.bias.spec == P(None)  # `out` is not mapped


class Mixer(eqx.Module):
    """A per-use dict on a nested path; the outermost dict wins over inner ones."""

    blocks: list[eqx.nn.Linear] = tx.field(
        axes={"[0].weight": ("mlp", "embed"), "[1].weight": ("embed", "mlp")}
    )


class MixerHolder(eqx.Module):
    mixer: Mixer = tx.field(axes={"blocks[0].weight": ("outer_a", "outer_b")})


def test_per_use_dict_nested_paths(getkey):
    def make(key):
        k1, k2 = jax.random.split(key)
        return Mixer([eqx.nn.Linear(4, 8, key=k1), eqx.nn.Linear(8, 4, key=k2)])

    mixer = _abstract(make, getkey())
    axes = tx.logical_axes(mixer)
    assert axes.blocks[0].weight == P("mlp", "embed")
    assert axes.blocks[1].weight == P("embed", "mlp")
    assert axes.blocks[0].bias == P("out")
    holder = tx.logical_axes(MixerHolder(mixer))
    assert holder.mixer.blocks[0].weight == P("outer_a", "outer_b")
    assert holder.mixer.blocks[1].weight == P("embed", "mlp")


# ---------------------------------------------------------------- stacking


class Block(eqx.Module):
    w_in: Float[Array, "embed mlp"]
    norm: eqx.nn.LayerNorm
    up: eqx.nn.Linear = tx.field(axes={"weight": ("mlp", "embed"), "bias": ("mlp",)})

    def __init__(self, key):
        self.w_in = jax.random.normal(key, (4, 16))
        self.norm = eqx.nn.LayerNorm(4)
        self.up = eqx.nn.Linear(4, 16, key=key)


class Stacked(eqx.Module):
    blocks: Block
    head: Float[Array, "embed vocab"]


def _stacked(key, layers=3):
    keys = jax.random.split(key, layers)
    blocks = eqx.filter_vmap(Block)(keys)
    return Stacked(blocks=blocks, head=np.zeros((4, 32)))


def test_stacked_layers_gain_leading_layers_dim(getkey):
    model = _abstract(_stacked, getkey())
    assert model.blocks.w_in.shape == (3, 4, 16)
    axes = tx.logical_axes(model)
    assert axes.blocks.w_in == P("layers", "embed", "mlp")
    assert axes.blocks.norm.weight == P("layers", "embed")
    assert axes.blocks.norm.bias == P("layers", "embed")
    assert axes.blocks.up.weight == P("layers", "mlp", "embed")
    assert axes.blocks.up.bias == P("layers", "mlp")
    assert axes.head == P("embed", "vocab")


def test_nested_stacking_gives_layers_and_layers_1(getkey):
    def make(key):
        keys = jax.random.split(key, 6).reshape(2, 3)
        blocks = eqx.filter_vmap(eqx.filter_vmap(Block))(keys)
        return Stacked(blocks=blocks, head=np.zeros((4, 32)))

    model = _abstract(make, getkey())
    assert model.blocks.w_in.shape == (2, 3, 4, 16)
    axes = tx.logical_axes(model)
    assert axes.blocks.w_in == P("layers", "layers_1", "embed", "mlp")
    assert axes.blocks.up.bias == P("layers", "layers_1", "mlp")


def test_works_on_filter_eval_shape_output(getkey):
    key = getkey()
    abstract = eqx.filter_eval_shape(_stacked, key)
    concrete = _stacked(key)
    assert isinstance(abstract.blocks.w_in, jax.ShapeDtypeStruct)
    assert tx.logical_axes(abstract) == tx.logical_axes(concrete)
    # ShapeDtypeStructs are not `eqx.is_array`, so compare with the concrete model.
    want = jax.tree.structure(eqx.filter(concrete, eqx.is_array))
    assert jax.tree.structure(tx.logical_axes(abstract), is_leaf=_is_spec) == want


# ---------------------------------------------------------------- eqx.nn defaults


def test_eqx_nn_defaults(getkey):
    def make(key):
        k = iter(jax.random.split(key, 5))
        return {
            "linear": eqx.nn.Linear(3, 5, key=next(k)),
            "embedding": eqx.nn.Embedding(11, 4, key=next(k)),
            "layernorm": eqx.nn.LayerNorm(4),
            "rmsnorm": eqx.nn.RMSNorm(4),
            "attention": eqx.nn.MultiheadAttention(2, 8, key=next(k)),
            "conv2d": eqx.nn.Conv2d(3, 6, kernel_size=3, key=next(k)),
            "conv1d": eqx.nn.Conv1d(3, 6, kernel_size=3, key=next(k)),
        }

    layers = _abstract(make, getkey())
    axes = {name: tx.logical_axes(layer) for name, layer in layers.items()}
    assert axes["linear"].weight == P("out", "in")
    assert axes["linear"].bias == P("out")
    assert axes["embedding"].weight == P("vocab", "embed")
    assert axes["layernorm"].weight == P("embed")
    assert axes["layernorm"].bias == P("embed")
    assert axes["rmsnorm"].weight == P("embed")
    attention = axes["attention"]
    for proj in ("query_proj", "key_proj", "value_proj"):
        assert getattr(attention, proj).weight == P("heads", "embed")
    assert attention.output_proj.weight == P("embed", "heads")
    assert layers["conv2d"].weight.shape == (6, 3, 3, 3)
    assert axes["conv2d"].weight == P("out", "in", None, None)
    assert layers["conv2d"].bias.shape == (6, 1, 1)
    assert axes["conv2d"].bias == P("out", None, None)
    assert axes["conv1d"].weight == P("out", "in", None)


def test_attention_bias_defaults(getkey):
    attention = _abstract(
        lambda key: eqx.nn.MultiheadAttention(
            2, 8, use_query_bias=True, use_output_bias=True, key=key
        ),
        getkey(),
    )
    axes = tx.logical_axes(attention)
    assert axes.query_proj.bias == P("heads")
    assert axes.output_proj.bias == P("embed")


def test_attention_heads_shard_whole_heads(getkey):
    """`heads` on the merged heads*head_size dim: 4 heads of 8 over model=4."""
    attention = _abstract(
        lambda key: eqx.nn.MultiheadAttention(4, 32, key=key), getkey()
    )
    mesh = tx.make_mesh(data=2, model=4)
    shardings = tx.shardings(attention, tx.Plan(tp=tx.TP()), mesh)
    assert attention.query_proj.weight.shape == (32, 32)
    q = shardings.query_proj.weight
    assert q.spec == P("model", None)
    assert q.shard_shape((32, 32)) == (8, 32)  # 8 rows = one head of size 8
    assert shardings.output_proj.weight.spec == P(None, "model")


# ---------------------------------------------------------------- tx.field


def test_field_passes_eqx_field_kwargs():
    class WithStatic(eqx.Module):
        w: jax.Array = tx.field(axes=("embed",))
        n: int = tx.field(static=True, default=4)

    model = WithStatic(np.zeros(4))
    assert tx.logical_axes(model).w == P("embed")
    leaves = jax.tree.leaves(model)
    assert len(leaves) == 1  # `n` is static


def test_field_axes_metadata_stored():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(Inner)}
    assert fields["w"].metadata["titanax_axes"] == ("field_a", "field_b")
    fields = {f.name: f for f in dataclasses.fields(Outer)}
    assert fields["inner"].metadata["titanax_axes"] == {"w": ("use_a", "use_b")}


@pytest.mark.parametrize(
    "axes, got",
    [
        pytest.param("embed", r"axes=...\)` .* got the str 'embed'", id="string"),
        pytest.param(
            ("embed", 3), r"got \('embed', 3\), whose entry 1 is int 3", id="int-name"
        ),
        pytest.param(("embed", ""), r"whose entry 1 is an empty name", id="empty-name"),
        pytest.param(5, r"got int 5", id="int"),
        pytest.param(
            {"weight": "mlp"}, r"`tx.field\(axes\['weight'\]=...\)`", id="dict-str"
        ),
    ],
)
def test_field_rejects_bad_axes(axes, got):
    with pytest.raises(ShardingError, match=got) as info:
        tx.field(axes=axes)
    assert info.value.suggestion is not None and "axes=" in info.value.suggestion


def test_path_rule_use_decided_and_matched():
    paths = ["M.blocks.w_in", "M.blocks.w_out", "M.head.weight"]
    rules = [(r"w_", ("a",)), (r"w_in$", ("b",)), (r"head", ("c",)), (r"x", ("d",))]
    use = path_rule_use(paths, rules)
    assert use.paths == tuple(paths)
    assert use.decided == (
        ("M.blocks.w_in", "M.blocks.w_out"),
        (),
        ("M.head.weight",),
        (),
    )
    assert use.matched[1] == ("M.blocks.w_in",)  # matched, but rule 0 decides it
    assert use.matched[3] == ()
