"""Plans: construction, describe, validation, unused rules (errors and the opt-out),
and a table of bad inputs.

Every bad input raises its typed error (`MeshError`, `PlanError`, `PipelineError`,
`ShardingError`, `ModelError`) from validation code, before anything is compiled: the
table runs each case with `jax_log_compiles` on and asserts that no "Compiling" record
appears.
"""

import contextlib
import logging
import re

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import titanax as tx
from titanax._errors import (
    ArgumentError,
    MeshError,
    ModelError,
    PipelineError,
    PlanError,
    ShardingError,
)


class MLP(eqx.Module):
    w_in: Float[Array, "embed mlp"]
    w_out: Float[Array, "mlp embed"]


def _mlp(embed=8, mlp=16):
    return MLP(np.zeros((embed, mlp), np.float32), np.zeros((mlp, embed), np.float32))


class Block(eqx.Module):
    w: Float[Array, "embed mlp"]


class Stack(eqx.Module):
    blocks: Block


def _stack(layers=4):
    return Stack(Block(np.zeros((layers, 8, 16), np.float32)))


class TooManyNames(eqx.Module):
    w: Float[Array, "embed mlp"]


class EmbedOnly(eqx.Module):
    scale: Float[Array, "embed"]


class PerUse(eqx.Module):
    up: eqx.nn.Linear = tx.field(axes={"wieght": ("mlp", "embed")})


class Misspelt(eqx.Module):
    """`mpl` for `mlp`: the typo the plan checks must not let through."""

    w_in: Float[Array, "embed mpl"]
    w_out: Float[Array, "mpl embed"]


class MisspeltWithHeads(eqx.Module):
    """`heads` matches a default TP rule; `mpl` is still a typo of another."""

    w_q: Float[Array, "embed heads"]
    w_in: Float[Array, "embed mpl"]


class HeadDim(eqx.Module):
    """`head_dim` is not a near-miss of `heads`: a different axis, no error."""

    w_in: Float[Array, "embed mlp"]
    w_o: Float[Array, "head_dim embed"]


def _misspelt():
    return Misspelt(np.zeros((8, 16), np.float32), np.zeros((16, 8), np.float32))


def _misspelt_with_heads():
    return MisspeltWithHeads(
        np.zeros((8, 16), np.float32), np.zeros((8, 16), np.float32)
    )


def _foreign_mlp():
    """A foreign model: `eqx.nn.MLP`, whose Linear layers default to `(out, in)`."""
    return eqx.filter_eval_shape(lambda k: eqx.nn.MLP(8, 8, 16, 2, key=k), KEY)


def _mesh():
    return tx.make_mesh(data=2, model=4)


# ------------------------------------------------------------------ construction


def test_defaults():
    assert tx.DP() == tx.DP(axis="data", accumulate_steps=1)
    assert tx.FSDP().axis == "data" and tx.FSDP().min_size == 1024
    assert tx.TP().axis == "model"
    assert dict(tx.TP().rules) == {"mlp": "model", "heads": "model", "vocab": "model"}
    assert dict(tx.TP("tp").rules) == {"mlp": "tp", "heads": "tp", "vocab": "tp"}
    assert tx.PP() == tx.PP(axis="pipe", microbatches=8, schedule="gpipe")
    assert tx.Plan().describe() == "single device (no parallelism)"


def test_plan_fields_are_static():
    plan = tx.Plan(dp=tx.DP(), tp=tx.TP(), rules=[(r"head", ("vocab", "embed"))])
    assert jax.tree.leaves(plan) == []
    assert plan.rules == ((r"head", ("vocab", "embed")),)
    assert hash(plan) == hash(
        tx.Plan(dp=tx.DP(), tp=tx.TP(), rules=[(r"head", ("vocab", "embed"))])
    )


def test_describe():
    plan = tx.Plan(
        dp=tx.DP(accumulate_steps=4),
        fsdp=tx.FSDP(min_size=64),
        tp=tx.TP(rules={"mlp": "model"}),
        pp=tx.PP(microbatches=8, schedule="1f1b"),
        rules=[(r"head", ("vocab", None))],
    )
    assert plan.describe() == (
        "DP over `data` (accumulate 4 microbatches) | "
        "FSDP over `data` (params ≥ 64 elements) | "
        "TP over `model` (mlp→model) | "
        "PP over `pipe` (1f1b, 8 microbatches) | "
        "1 path rule(s)"
    )


def test_axes_and_batch_spec():
    plan = tx.Plan(dp=tx.DP("data"), fsdp=tx.FSDP("fsdp"), tp=tx.TP())
    assert plan.data_axes == ("data", "fsdp")
    assert plan.mesh_axes == ("data", "fsdp", "model")
    assert plan.batch_spec(3) == P(("data", "fsdp"), None, None)
    assert plan.batch_spec(0) == P()
    assert tx.Plan(dp=tx.DP()).batch_spec(2) == P("data", None)
    assert tx.Plan().batch_spec(1) == P(None)
    mesh = tx.make_mesh(data=2, fsdp=2, model=2)
    assert plan.data_parallel_size(mesh) == 4


def test_dp_and_fsdp_may_share_an_axis():
    plan = tx.Plan(dp=tx.DP(), fsdp=tx.FSDP())
    assert plan.data_axes == ("data",)
    assert plan.accumulate_steps == 1
    assert tx.Plan(dp=tx.DP(accumulate_steps=3)).accumulate_steps == 3


def test_logical_rules():
    plan = tx.Plan(tp=tx.TP(rules={"mlp": "model", "heads": None}), pp=tx.PP())
    assert plan.logical_rules() == {"mlp": "model", "layers": "pipe"}


def test_validate_passes_for_good_plans():
    mesh = _mesh()
    tx.Plan(dp=tx.DP(), tp=tx.TP()).validate(mesh, _mlp())
    tx.Plan(fsdp=tx.FSDP(), tp=tx.TP()).validate(mesh, _mlp())
    pp_mesh = tx.make_mesh(pipe=2, data=4)
    tx.Plan(dp=tx.DP(), pp=tx.PP(microbatches=2)).validate(pp_mesh, _stack())


def test_unmapped_logical_names_are_replicated():
    specs = tx.shardings(_mlp(), tx.Plan(dp=tx.DP()), _mesh())
    assert specs.w_in.spec == P(None, None)


# ------------------------------------------------------------------ unused rules


def test_default_tp_rules_need_only_one_match():
    # `_mlp` has `mlp` but neither `heads` nor `vocab`: the defaults are a menu.
    specs = tx.shardings(_mlp(), tx.Plan(tp=tx.TP()), _mesh())
    assert specs.w_in.spec == P(None, "model")
    assert specs.w_out.spec == P("model", None)


def test_head_dim_is_not_a_near_miss_of_heads():
    model = HeadDim(np.zeros((8, 16), np.float32), np.zeros((4, 8), np.float32))
    specs = tx.shardings(model, tx.Plan(tp=tx.TP()), _mesh())
    assert specs.w_in.spec == P(None, "model")
    assert specs.w_o.spec == P(None, None)  # `head_dim` is not mapped


def test_allow_unused_true_keeps_every_rule():
    plan = tx.Plan(
        tp=tx.TP(rules={"mlp": "model", "ffn": "model"}),
        rules=[(r"w_in$", ("embed", "mlp")), (r"\.bias$", ("mlp",))],
        allow_unused=True,
    )
    specs = tx.shardings(_mlp(), plan, _mesh())
    assert specs.w_in.spec == P(None, "model")  # the rules that match still apply
    assert specs.w_out.spec == P("model", None)


def test_allow_unused_names_only_the_rules_it_lists():
    rules = [(r"w_in$", ("embed", "mlp")), (r"\.bias$", ("mlp",))]
    tp = tx.TP(rules={"mlp": "model", "ffn": "model"})
    plan = tx.Plan(tp=tp, rules=rules, allow_unused=("ffn", r"\.bias$"))
    assert tx.shardings(_mlp(), plan, _mesh()).w_in.spec == P(None, "model")
    # Allowing only the TP rule leaves the path rule checked, and the reverse.
    with pytest.raises(PlanError, match=r'path rule r"\\.bias\$" to match'):
        tx.shardings(
            _mlp(), tx.Plan(tp=tp, rules=rules, allow_unused=("ffn",)), _mesh()
        )
    with pytest.raises(PlanError, match=r"TP rule `ffn`"):
        plan = tx.Plan(tp=tp, rules=rules, allow_unused=(r"\.bias$",))
        tx.shardings(_mlp(), plan, _mesh())


def test_allow_unused_on_default_rules_replicates():
    model = EmbedOnly(np.zeros(8, np.float32))
    specs = tx.shardings(model, tx.Plan(tp=tx.TP(), allow_unused=True), _mesh())
    assert specs.scale.spec == P(None)
    plan = tx.Plan(tp=tx.TP(), allow_unused=("vocab",))  # `mpl` is still a typo
    with pytest.raises(PlanError, match=r"near-miss `mpl`") as info:
        tx.shardings(_misspelt_with_heads(), plan, _mesh())
    assert info.value.path == "MisspeltWithHeads.w_in"
    # Allowing `mlp` to go unused accepts `mpl` as a name of its own: replicated.
    plan = tx.Plan(tp=tx.TP(), allow_unused=("mlp",))
    specs = tx.shardings(_misspelt_with_heads(), plan, _mesh())
    assert specs.w_q.spec == P(None, "model")
    assert specs.w_in.spec == P(None, None)


def test_unused_rule_errors_name_the_rule():
    plan = tx.Plan(rules=[(r"w_in$", ("embed", "mlp")), (r"w_ni", ("embed", "mlp"))])
    with pytest.raises(PlanError) as info:
        plan.validate(_mesh(), _mlp())
    assert info.value.path == "Plan.rules[1]"
    assert "closest: `MLP.w_in`, `MLP.w_out`." in info.value.message
    assert "allow_unused=('w_ni',)" in (info.value.suggestion or "")


def test_shadowed_rule_names_the_winner():
    plan = tx.Plan(rules=[(r"w", ("embed", "mlp")), (r"w_in$", ("embed", None))])
    with pytest.raises(PlanError) as info:
        tx.shardings(_mlp(), plan, _mesh())
    assert info.value.path == "Plan.rules[1]"
    assert "decided by the earlier rule 'w' (`Plan.rules[0]`)" in info.value.message
    # In the other order both rules decide an array: no error, w_in from rule 0.
    plan = tx.Plan(
        tp=tx.TP(rules={"mlp": "model"}),
        rules=[(r"w_in$", ("embed", None)), (r"w", ("embed", "mlp"))],
    )
    specs = tx.shardings(_mlp(), plan, _mesh())
    assert specs.w_in.spec == P(None, None)
    assert specs.w_out.spec == P(None, "model")


def test_path_rules_on_a_foreign_model_shard_it():
    """The outside-model path: rules name the Linear layers' dims, TP maps them."""
    plan = tx.Plan(
        tp=tx.TP(),
        rules=[
            (r"layers\[[01]\]\.weight$", ("mlp", None)),
            (r"layers\[[01]\]\.bias$", ("mlp",)),
            (r"layers\[2\]\.weight$", (None, "mlp")),
        ],
    )
    specs = tx.shardings(_foreign_mlp(), plan, _mesh())
    assert specs.layers[0].weight.spec == P("model", None)
    assert specs.layers[0].bias.spec == P("model")
    assert specs.layers[1].weight.spec == P("model", None)
    assert specs.layers[2].weight.spec == P(None, "model")
    assert specs.layers[2].bias.spec == P(None)  # `out` is not mapped


def test_rules_are_checked_once_per_call_not_at_construction():
    """A plan is built before any model exists: the checks need the model."""
    plan = tx.Plan(tp=tx.TP(rules={"nothing": "model"}), rules=[(r"nope", ("a",))])
    assert plan.rules == ((r"nope", ("a",)),)
    assert plan.allow_unused is False


# ------------------------------------------------------------------ bad inputs


@contextlib.contextmanager
def _no_compilation(caplog):
    """Fail if JAX compiles anything inside the block."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jax"), jax.log_compiles(True):
        yield
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == []


def test_no_compilation_detector_detects(caplog):
    with pytest.raises(AssertionError):
        with _no_compilation(caplog):
            jax.jit(lambda x: x * 3 + 1)(np.arange(5.0))


KEY = jax.random.key(0)


def _two_args(key, width):
    return _mlp(mlp=width)


def _keyword_key(*, key):
    return _mlp()


def _init_not_divisible():
    return tx.init(lambda k: _mlp(mlp=6), KEY, tx.Plan(tp=tx.TP()), _mesh())


# (id, thunk, error type, message regex, suggestion regex)
BAD_INPUTS = [
    (
        "mesh-product",
        lambda: tx.make_mesh(data=3, model=4),
        MeshError,
        r"The mesh data=3 x model=4 = 12 devices, but 8 device\(s\) are available",
        r"product of the axis sizes equal the device count",
    ),
    (
        "mesh-two-fills",
        lambda: tx.make_mesh(data=-1, model=-1),
        MeshError,
        r"Only one mesh axis may be -1, got \['data', 'model'\]",
        r"every axis but one",
    ),
    (
        "mesh-fill-not-dividing",
        lambda: tx.make_mesh(data=-1, model=3),
        MeshError,
        r"Cannot fill axis `data`: 8 devices .* product 3 \(data=-1 x model=3\)",
        r"divides the device count",
    ),
    (
        "mesh-negative-size",
        lambda: tx.make_mesh(data=-2, model=4),
        MeshError,
        r"Mesh axis `data` must have a positive size or -1, got -2",
        r"positive int",
    ),
    (
        "mesh-no-axes",
        lambda: tx.make_mesh(),
        MeshError,
        r"needs at least one named axis",
        r"tx.make_mesh\(data=-1\)",
    ),
    (
        "mesh-unknown-axis",
        lambda: tx.MeshSpec.of(_mesh()).size("modle"),
        MeshError,
        r"The mesh has no axis `modle`",
        r"Use one of \('data', 'model'\)",
    ),
    (
        "batch-not-divisible",
        lambda: tx.MeshSpec.of(_mesh()).validate_compatibility(7),
        MeshError,
        r"global batch of 7 does not split over the data axes data=2 \(2 shards\)",
        r"divisible by 2, e\.g\. 6 or 8",
    ),
    (
        "simulate-after-init",
        lambda: tx.simulate_cpu_devices(4),
        MeshError,
        r"already initialised with 8 CPU device\(s\)",
        r"top of your script",
    ),
    (
        "simulate-zero",
        lambda: tx.simulate_cpu_devices(0),
        MeshError,
        r"expects a positive int, got 0",
        r"simulate_cpu_devices\(8\)",
    ),
    (
        "plan-axis-not-in-mesh",
        lambda: tx.Plan(dp=tx.DP(), tp=tx.TP("modle")).validate(_mesh(), _mlp()),
        PlanError,
        r"`plan.tp` uses mesh axis `modle`, .* Did you mean `model`\?",
        r"Add `modle` to the mesh",
    ),
    (
        "dim-not-divisible",
        lambda: tx.Plan(tp=tx.TP()).validate(_mesh(), _mlp(mlp=6)),
        PlanError,
        r"maps `mlp` to mesh axis `model` \(size 4\), but `mlp` has size 6 at "
        r"`MLP.w_in`",
        r"Use a `model` size that divides 6, or map `mlp` to None",
    ),
    (
        "init-dim-not-divisible",
        _init_not_divisible,
        PlanError,
        r"`mlp` has size 6 at `MLP.w_in`",
        r"divides 6",
    ),
    (
        "dp-tp-same-axis",
        lambda: tx.Plan(dp=tx.DP("data"), tp=tx.TP("data")),
        PlanError,
        r"Mesh axis `data` is used by both `dp` and `tp`",
        r"Only DP and FSDP may share an axis",
    ),
    (
        "tp-rule-other-axis",
        lambda: tx.TP(rules={"mlp": "data"}),
        PlanError,
        r"Expected the TP axis `model` or None for TP rule `mlp`, got `data`",
        r'Map `mlp` to "model" or None',
    ),
    (
        "tp-rule-bad-item",
        lambda: tx.TP(rules=[("mlp", "model", "extra")]),
        PlanError,
        r"Expected a \(logical axis, mesh axis\) pair, got \('mlp', 'model', 'extra'\) "
        r"at `TP.rules\[0\]`",
        r"TP\(rules=\{\"mlp\": \"model\"",
    ),
    (
        "same-mesh-axis-twice",
        lambda: tx.shardings(
            _mlp(), tx.Plan(tp=tx.TP(rules={"mlp": "model", "embed": "model"})), _mesh()
        ),
        PlanError,
        r"`MLP.w_in` would use mesh axis `model` for two dims",
        r"at most one",
    ),
    (
        "pp-bad-schedule",
        lambda: tx.PP(schedule="zero-bubble"),
        PipelineError,
        r"expects \"gpipe\" or \"1f1b\", got 'zero-bubble'",
        r'schedule="1f1b"',
    ),
    (
        "pp-zero-microbatches",
        lambda: tx.PP(microbatches=0),
        PipelineError,
        r"`PP\(microbatches=...\)` expects an int ≥ 1, got 0",
        r"as many microbatches as pipeline stages",
    ),
    (
        "pp-no-layers-dim",
        lambda: tx.Plan(pp=tx.PP()).validate(tx.make_mesh(pipe=2, data=4), _mlp()),
        PipelineError,
        r"no array of the model has one",
        r"eqx.filter_vmap",
    ),
    (
        "pp-layers-not-divisible",
        lambda: tx.Plan(pp=tx.PP()).validate(tx.make_mesh(pipe=2, data=4), _stack(3)),
        PipelineError,
        r"maps `layers` to mesh axis `pipe` \(size 2\), but `layers` has size 3",
        r"Use a `pipe` size that divides 3",
    ),
    (
        "dp-accumulate-zero",
        lambda: tx.DP(accumulate_steps=0),
        PlanError,
        r"`DP\(accumulate_steps=...\)` expects an int ≥ 1, got 0",
        r"1 for no accumulation",
    ),
    (
        "fsdp-negative-min-size",
        lambda: tx.FSDP(min_size=-1),
        PlanError,
        r"`FSDP\(min_size=...\)` expects an int ≥ 0, got -1",
        r"min_size=1024",
    ),
    (
        "axis-not-a-string",
        lambda: tx.DP(axis=0),  # type: ignore[arg-type]
        PlanError,
        r"`DP\(axis=...\)` expects a mesh axis name \(a non-empty str\), got 0",
        r'DP\(axis="data"\)',
    ),
    (
        "plan-part-wrong-type",
        lambda: tx.Plan(dp=tx.FSDP()),  # type: ignore[arg-type]
        PlanError,
        r"`Plan\(dp=...\)` expects a `tx.DP` or None, got FSDP",
        r"Plan\(dp=tx.DP\(\)\)",
    ),
    (
        "path-rule-bad-regex",
        lambda: tx.Plan(rules=[(r"blocks[", ("embed",))]),
        PlanError,
        r"Expected a valid regex, got 'blocks\[' \(.*\) at `Plan.rules\[0\]`",
        r"re.search",
    ),
    (
        "path-rule-axes-string",
        lambda: tx.Plan(rules=[(r"head", "vocab")]),
        PlanError,
        r"Expected a tuple of logical axis names .* got the str 'vocab' at "
        r"`Plan.rules\[0\]` \('head'\)",
        r'Name each dim, e.g. `\("vocab", "embed"\)`',
    ),
    (
        "non-module-model",
        lambda: tx.shardings({"w": np.zeros(4)}, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"Expected an `eqx.Module` as the model, got dict",
        r"Plan\(rules=",
    ),
    (
        "not-a-plan",
        lambda: tx.shardings(_mlp(), tx.DP(), _mesh()),
        PlanError,
        r"`shardings\(plan=...\)` expected a `tx.Plan`, got DP",
        r"tx.Plan\(dp=tx.DP\(\)\)",
    ),
    (
        "not-a-mesh",
        lambda: tx.shardings(_mlp(), tx.Plan(), {"data": 8}),
        ArgumentError,
        r"`shardings\(mesh=...\)` expected a `jax.sharding.Mesh`, got dict",
        r"tx.make_mesh",
    ),
    (
        "field-axes-string",
        lambda: tx.field(axes="embed"),
        ShardingError,
        r"`tx.field\(axes=...\)` expects a tuple of axis names \(str, or None for an "
        r"unnamed dim\), got the str 'embed'",
        r'axes=\("embed", "mlp"\)',
    ),
    (
        "annotation-too-many-dims",
        lambda: tx.logical_axes(TooManyNames(np.zeros(4, np.float32))),
        ShardingError,
        r"annotation 'embed mlp' names 2 dims .* `TooManyNames.w` has only 1",
        r"exactly one axis",
    ),
    (
        "rule-too-many-dims",
        lambda: tx.logical_axes(_mlp(), [(r"w_in", ("a", "b", "c"))]),
        ShardingError,
        r"plan rule 'w_in' names 3 dims .* `MLP.w_in` has only 2",
        r"exactly one axis",
    ),
    # --- malformed path rules: `Plan(rules=...)` ------------------------------------
    (
        "path-rule-axes-none",
        lambda: tx.Plan(rules=[("w", None)]),
        PlanError,
        r"Expected a tuple of logical axis names .* got None at `Plan.rules\[0\]`",
        r"to leave a 2-D array replicated, write `\(None, None\)`",
    ),
    (
        "path-rule-axes-int",
        lambda: tx.Plan(rules=[("w", 3)]),
        PlanError,
        r"got int 3 at `Plan.rules\[0\]`",
        r"Name each dim",
    ),
    (
        "path-rule-axes-int-name",
        lambda: tx.Plan(rules=[("w", ("embed", 3))]),
        PlanError,
        r"got \('embed', 3\), whose entry 1 is int 3 at `Plan.rules\[0\]`",
        r"Name each dim",
    ),
    (
        "path-rule-axes-empty-name",
        lambda: tx.Plan(rules=[("w", ("embed", ""))]),
        PlanError,
        r"got \('embed', ''\), whose entry 1 is an empty name",
        r"Name each dim",
    ),
    (
        "path-rule-axes-nested",
        lambda: tx.Plan(rules=[("w", (("embed", "mlp"),))]),
        PlanError,
        r"whose entry 0 is tuple \('embed', 'mlp'\)",
        r"Name each dim",
    ),
    (
        "path-rule-one-item",
        lambda: tx.Plan(rules=[("w",)]),
        PlanError,
        r"Expected a \(regex, axes\) pair, got \('w',\) at `Plan.rules\[0\]`",
        r"rules=\[\(r\"head",
    ),
    (
        "path-rule-three-items",
        lambda: tx.Plan(rules=[("w", ("embed",), "mlp")]),
        PlanError,
        r"Expected a \(regex, axes\) pair, got \('w', \('embed',\), 'mlp'\)",
        r"rules=\[",
    ),
    (
        "path-rule-bare-string-item",
        lambda: tx.Plan(rules=["w_in", "w_out"]),
        PlanError,
        r"Expected a \(regex, axes\) pair, got 'w_in' at `Plan.rules\[0\]`",
        r"rules=\[",
    ),
    (
        "path-rule-regex-not-str",
        lambda: tx.Plan(rules=[(3, ("embed",))]),
        PlanError,
        r"Expected a non-empty regex str as the first item, got int 3 at "
        r"`Plan.rules\[0\]`",
        r"matched with `re.search`",
    ),
    (
        "path-rule-compiled-regex",
        lambda: tx.Plan(rules=[(re.compile("w"), ("embed",))]),
        PlanError,
        r"Expected a non-empty regex str as the first item, got Pattern",
        r"Write the pattern as a str",
    ),
    (
        "path-rule-empty-regex",
        lambda: tx.Plan(rules=[("", ("embed",))]),
        PlanError,
        r"Expected a non-empty regex str as the first item, got str ''",
        r"Write the pattern as a str",
    ),
    (
        "path-rule-duplicate-regex",
        lambda: tx.Plan(rules=[("w", ("a",)), ("w", ("b",))]),
        PlanError,
        r"Expected each regex once, got 'w' again at `Plan.rules\[1\]`",
        r"Remove the repeated rule",
    ),
    (
        "path-rules-single-pair",
        lambda: tx.Plan(rules=("w_in", ("embed", "mlp"))),
        PlanError,
        r"got a single pair \('w_in', \('embed', 'mlp'\)\)",
        r"Wrap it in a list: `rules=\[\('w_in', \('embed', 'mlp'\)\)\]`",
    ),
    (
        "path-rules-tp-style-dict",
        lambda: tx.Plan(rules={"mlp": "model"}),
        PlanError,
        r"expects a list of \(regex, axes\) pairs, got a dict of logical axis -> "
        r"mesh axis \(TP rules\)",
        r"tx.TP\(rules=\{'mlp': 'model'\}\)",
    ),
    (
        "path-rules-dict-of-axes",
        lambda: tx.Plan(rules={"w_in": ("embed", "mlp")}),
        PlanError,
        r"expects a list of \(regex, axes\) pairs, got a dict\.",
        r"Write a list: `rules=\[\('w_in', \('embed', 'mlp'\)\)\]`",
    ),
    (
        "path-rules-string",
        lambda: tx.Plan(rules="w_in"),
        PlanError,
        r"expects a list of \(regex, axes\) pairs, got str 'w_in'",
        r"rules=\[",
    ),
    (
        "path-rules-int",
        lambda: tx.Plan(rules=3),
        PlanError,
        r"expects a list of \(regex, axes\) pairs, got int 3",
        r"rules=\[",
    ),
    (
        "logical-axes-bad-rules",
        lambda: tx.logical_axes(_mlp(), [("w_in", None)]),
        PlanError,
        r"got None at `Plan.rules\[0\]`",
        r"\(None, None\)",
    ),
    # --- malformed TP rules: `TP(rules=...)` ----------------------------------------
    (
        "tp-rules-path-regex",
        lambda: tx.TP(rules=[("blocks.*w", ("mlp", None))]),
        PlanError,
        r"Expected a logical axis name \(`mlp`, `heads`, ...\) as a TP rule, got the "
        r"path rule 'blocks.\*w' -> \('mlp', None\) at `TP.rules\[0\]`",
        r"tx.Plan\(tp=tx.TP\(\"model\"\), rules=\[\(r\"blocks.\*w\", "
        r"\('mlp', None\)\)\]\)",
    ),
    (
        "tp-rules-dotted-path",
        lambda: tx.TP("tp", rules={"head.weight": "tp"}),
        PlanError,
        r"got the path rule 'head.weight' -> 'tp' at `TP.rules\[0\]`",
        r"tx.Plan\(tp=tx.TP\(\"tp\"\), rules=\[\(r\"head.weight\"",
    ),
    (
        "tp-rules-indexed-path",
        lambda: tx.TP(rules={"layers[0]": "model"}),
        PlanError,
        r"got the path rule 'layers\[0\]' -> 'model'",
        r"Plan\(tp=",
    ),
    (
        "tp-rules-axes-as-value",
        lambda: tx.TP(rules={"w_in": ("embed", "mlp")}),
        PlanError,
        r"got the path rule 'w_in' -> \('embed', 'mlp'\)",
        r"rules=\[\(r\"w_in\", \('embed', 'mlp'\)\)\]",
    ),
    (
        "tp-rules-string",
        lambda: tx.TP(rules="mlp"),
        PlanError,
        r"`TP\(rules=...\)` expects a dict of logical axis name -> mesh axis, got str "
        r"'mlp'",
        r'TP\(rules=\{"mlp": "model", "heads": "model"\}\)',
    ),
    (
        "tp-rules-int",
        lambda: tx.TP(rules=4),
        PlanError,
        r"expects a dict of logical axis name -> mesh axis, got int 4",
        r"TP\(rules=",
    ),
    (
        "tp-rules-empty",
        lambda: tx.TP(rules={}),
        PlanError,
        r"Expected at least one TP rule, got none at `TP.rules`: TP would shard "
        r"nothing",
        r"leave `tp` out of the plan",
    ),
    (
        "tp-rules-key-not-str",
        lambda: tx.TP(rules={3: "model"}),
        PlanError,
        r"Expected a logical axis name \(a non-empty str\) as a TP rule key, got int "
        r"3 at `TP.rules\[0\]`",
        r"TP\(rules=",
    ),
    (
        "tp-rules-empty-key",
        lambda: tx.TP(rules={"": "model"}),
        PlanError,
        r"as a TP rule key, got str '' at `TP.rules\[0\]`",
        r"TP\(rules=",
    ),
    (
        "tp-rules-mesh-axis-int",
        lambda: tx.TP(rules={"mlp": 1}),
        PlanError,
        r"Expected the mesh axis `model` or None for TP rule `mlp`, got int 1 at "
        r"`TP.rules\[0\]`",
        r'Write `"mlp": "model"` \(shard\) or `"mlp": None`',
    ),
    (
        "tp-rules-duplicate",
        lambda: tx.TP(rules=[("mlp", "model"), ("mlp", None)]),
        PlanError,
        r"Expected each logical axis once in TP rules, got `mlp` again at "
        r"`TP.rules\[1\]`",
        r"Keep one rule for `mlp`",
    ),
    # --- rules that match nothing, before anything is placed -----------------------
    (
        "path-rule-matches-nothing",
        lambda: tx.shardings(
            _mlp(), tx.Plan(rules=[(r"w_ni", ("embed", "mlp"))]), _mesh()
        ),
        PlanError,
        r"Expected path rule 'w_ni' to match an array of `MLP`, got no match among its "
        r"2 array paths at `Plan.rules\[0\]`; the closest: `MLP.w_in`, `MLP.w_out`",
        r"Fix the regex .* `\(r\"MLP\\.w_in\$\", \('embed', 'mlp'\)\)`.*"
        r"allow_unused=\('w_ni',\)",
    ),
    (
        "path-rule-misspelt-foreign",
        lambda: tx.Plan(rules=[(r"layers\[1\]\.wieght$", ("mlp", None))]).validate(
            _mesh(), _foreign_mlp()
        ),
        PlanError,
        r"got no match among its 6 array paths .* the closest: "
        r"`MLP.layers\[1\].weight`",
        r'`\(r"layers\\\[1\\\]\\.weight\$", \(\'mlp\', None\)\)`',
    ),
    (
        "path-rule-shadowed",
        lambda: tx.shardings(
            _mlp(),
            tx.Plan(rules=[(r"w", ("embed", "mlp")), (r"w_in$", ("embed", None))]),
            _mesh(),
        ),
        PlanError,
        r"Expected path rule 'w_in\$' to decide the axes of an array, got none at "
        r"`Plan.rules\[1\]`: the arrays it matches \(`MLP.w_in`\) are decided by "
        r"the earlier rule 'w'",
        r"Put the more specific rule first",
    ),
    (
        "path-rule-unused-init",
        lambda: tx.init(
            lambda k: _mlp(), KEY, tx.Plan(rules=[(r"head", ("vocab", None))]), _mesh()
        ),
        PlanError,
        r"Expected path rule 'head' to match an array of `MLP`",
        r"allow_unused=\('head',\)",
    ),
    (
        "path-rule-unused-shard",
        lambda: tx.shard(_mlp(), tx.Plan(rules=[(r"head", ("vocab", None))]), _mesh()),
        PlanError,
        r"Expected path rule 'head' to match an array of `MLP`",
        r"allow_unused",
    ),
    (
        "path-rule-unused-explain",
        lambda: tx.explain(
            _mlp(), tx.Plan(rules=[(r"head", ("vocab", None))]), _mesh()
        ),
        PlanError,
        r"Expected path rule 'head' to match an array of `MLP`",
        r"allow_unused",
    ),
    (
        "tp-rule-unused",
        lambda: tx.Plan(tp=tx.TP(rules={"mlp": "model", "mpl": "model"})).validate(
            _mesh(), _mlp()
        ),
        PlanError,
        r"Expected TP rule `mpl` to name a logical axis of the model, got none at "
        r"`Plan.tp.rules`: the model's logical axes are \['embed', 'mlp'\]\. Did "
        r"you mean `mlp` \(at `MLP.w_in`\)\?",
        r'allow_unused=\("mpl",\)',
    ),
    (
        "tp-rule-model-misspelt",
        lambda: tx.shardings(
            _misspelt(), tx.Plan(tp=tx.TP(rules={"mlp": "model"})), _mesh()
        ),
        PlanError,
        r"Expected TP rule `mlp` .* Did you mean `mpl` \(at `Misspelt.w_in`\)\?",
        r"name the model's dims `mlp`",
    ),
    (
        "tp-rule-names-an-array",
        lambda: tx.shardings(
            _mlp(), tx.Plan(tp=tx.TP(rules={"w_in": "model"})), _mesh()
        ),
        PlanError,
        r"`w_in` is the name of an array \(`MLP.w_in`\), not a logical axis",
        r"Rename the rule",
    ),
    (
        "tp-default-matches-nothing",
        lambda: tx.Plan(tp=tx.TP()).validate(_mesh(), EmbedOnly(np.zeros(8))),
        PlanError,
        r"Expected the model to name at least one of TP's default logical axes "
        r"\(`mlp`, `heads`, `vocab`\) at `Plan.tp.rules`, got none \(its logical "
        r"axes are \['embed'\]\), so TP would shard nothing\.\nFix",
        r'TP\(rules=\{"embed": "model"\}\)`; or pass `allow_unused=True`',
    ),
    (
        "tp-default-model-misspelt",
        lambda: tx.shardings(_misspelt(), tx.Plan(tp=tx.TP()), _mesh()),
        PlanError,
        r"so TP would shard nothing\. Did you mean `mlp` where the model says `mpl` "
        r"\(at `Misspelt.w_in`\)\?",
        r"Name the dims TP should split",
    ),
    (
        "tp-default-near-miss",
        lambda: tx.shardings(_misspelt_with_heads(), tx.Plan(tp=tx.TP()), _mesh()),
        PlanError,
        r"Expected TP's default logical axis `mlp`, got the near-miss `mpl` at "
        r"`MisspeltWithHeads.w_in`, which no rule maps, so it stays replicated\. Did "
        r"you mean `mlp`\?",
        r"Rename `mpl` to `mlp` in the model",
    ),
    (
        "path-rule-axis-misspelt-foreign",
        # The case: a rule names `mpl` on an outside model; TP's defaults.
        lambda: tx.Plan(
            tp=tx.TP(), rules=[(r"layers\[[01]\]\.weight$", ("mpl", None))]
        ).validate(_mesh(), _foreign_mlp()),
        PlanError,
        r"Did you mean `mlp` where the model says `mpl` \(at "
        r"`MLP.layers\[0\].weight`\)\?",
        r"Name the dims TP should split",
    ),
    (
        "allow-unused-unknown-rule",
        lambda: tx.Plan(tp=tx.TP(rules={"mlp": "model"}), allow_unused=("mpl",)),
        PlanError,
        r"Expected `allow_unused` to name this plan's TP logical axes or path-rule "
        r"regexes \['mlp'\], got 'mpl' at `Plan.allow_unused`. Did you mean 'mlp'\?",
        r"exactly as written",
    ),
    (
        "allow-unused-string",
        lambda: tx.Plan(tp=tx.TP(), allow_unused="vocab"),
        PlanError,
        r"expects True, False or a tuple of rule names, got str 'vocab'",
        r"allow_unused=\('vocab',\)",
    ),
    (
        "allow-unused-int",
        lambda: tx.Plan(tp=tx.TP(), allow_unused=1),
        PlanError,
        r"expects True, False or a tuple of rule names, got int 1",
        r"allow_unused=True",
    ),
    (
        "allow-unused-not-str",
        lambda: tx.Plan(tp=tx.TP(), allow_unused=("mlp", 3)),
        PlanError,
        r"expects rule names \(str\), got int 3 in \('mlp', 3\)",
        r"Name TP logical axes",
    ),
    # --- model factories: `tx.init(make_model, key, plan, mesh)` ---------------------
    (
        "init-class-needs-args",
        lambda: tx.init(eqx.nn.Linear, KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"Expected `make_model` to be callable as `make_model\(key\)` .* got the "
        r"class `Linear`, whose constructor is `Linear\(in_features, out_features, "
        r"use_bias=True, dtype=None, \*, key\)`",
        r"`lambda key: Linear\(..., key=key\)`",
    ),
    (
        "init-module-fields-as-args",
        lambda: tx.init(MLP, KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"got the class `MLP`, whose constructor is `MLP\(w_in, w_out\)`",
        r"`lambda key: MLP\(..., key=key\)`",
    ),
    (
        "init-zero-arg-function",
        lambda: tx.init(lambda: _mlp(), KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"callable as `make_model\(key\)` .* got a lambda, which takes no arguments",
        r"`lambda key: MyModel\(..., key=key\)`",
    ),
    (
        "init-two-arg-function",
        lambda: tx.init(_two_args, KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"got the function `_two_args`, whose signature is `\(key, width\)`",
        r"lambda key:",
    ),
    (
        "init-keyword-only-key",
        lambda: tx.init(_keyword_key, KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"got the function `_keyword_key`, whose signature is `\(\*, key\)`",
        r"lambda key:",
    ),
    (
        "init-not-callable",
        lambda: tx.init("MLP", KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"Expected `make_model` to be a function `key -> eqx.Module`, got str 'MLP'",
        r"Pass e.g. `lambda key:",
    ),
    (
        "init-built-model",
        lambda: tx.init(_mlp(), KEY, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"Expected `make_model` to be a function `key -> eqx.Module`, got an "
        r"already-built `MLP`",
        r"tx.shard\(model, plan, mesh\)",
    ),
    (
        "init-returns-dict",
        lambda: tx.init(
            lambda k: {"w": jax.random.normal(k, (4,))}, KEY, tx.Plan(), _mesh()
        ),
        ModelError,
        r"Expected `make_model\(key\)` to return an `eqx.Module`, got dict",
        r"Return the model itself",
    ),
    (
        "init-returns-class",
        lambda: tx.init(lambda k: MLP, KEY, tx.Plan(), _mesh()),
        ModelError,
        r"to return an `eqx.Module`, got the class `MLP`",
        r"Return the model itself",
    ),
    (
        "init-returns-model-and-state",
        lambda: tx.init(
            eqx.nn.make_with_state(
                lambda key: eqx.nn.BatchNorm(4, "batch", mode="batch")
            ),
            KEY,
            tx.Plan(),
            _mesh(),
        ),
        ModelError,
        r"to return an `eqx.Module`, got tuple of \(BatchNorm, State\) \(a tuple, as "
        r"`eqx.nn.make_with_state` returns",
        r"Return the model itself",
    ),
    (
        "init-int-key",
        lambda: tx.init(lambda k: _mlp(), 0, tx.Plan(), _mesh()),
        ModelError,
        r"Expected a PRNG key for `make_model\(key\)`, got int 0",
        r"jax.random.key\(seed\)",
    ),
    (
        "init-float-key",
        lambda: tx.init(lambda k: _mlp(), np.zeros(2, np.float32), tx.Plan(), _mesh()),
        ModelError,
        r"Expected a PRNG key .* of dtype float32 and shape \(2,\)",
        r"jax.random.key\(seed\)",
    ),
    (
        "shard-a-class",
        lambda: tx.shard(MLP, tx.Plan(dp=tx.DP()), _mesh()),
        ModelError,
        r"Expected an `eqx.Module` as the model, got the class `MLP`",
        r"tx.init\(make_model, key, plan, mesh\)",
    ),
    (
        "per-use-missing-leaf",
        lambda: tx.logical_axes(
            eqx.filter_eval_shape(lambda k: PerUse(eqx.nn.Linear(2, 3, key=k)), KEY)
        ),
        ShardingError,
        r"The axes dict on `PerUse.up` names `wieght`.*\['weight', 'bias'\]",
        r"Use one of \['weight', 'bias'\]",
    ),
]


@pytest.mark.parametrize(
    "thunk, error, message, suggestion",
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_input_raises_typed_error_before_compiling(
    thunk, error, message, suggestion, caplog
):
    with _no_compilation(caplog):
        with pytest.raises(error, match=message) as info:
            thunk()
    assert type(info.value) is error  # the exact class, not just a base
    assert info.value.suggestion, "every error carries a suggestion"
    assert re.search(suggestion, info.value.suggestion)
    assert f"Fix: {info.value.suggestion}" in str(info.value)


def test_at_least_eighty_bad_inputs():
    assert len(BAD_INPUTS) >= 80
    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


def test_errors_name_the_path():
    with pytest.raises(PlanError) as info:
        tx.Plan(tp=tx.TP()).validate(_mesh(), _mlp(mlp=6))
    assert info.value.path == "MLP.w_in"
    with pytest.raises(ShardingError) as info:
        tx.logical_axes(TooManyNames(np.zeros(4, np.float32)))
    assert info.value.path == "TooManyNames.w"


def test_errors_are_value_errors():
    """Users catching ValueError keep working."""
    for error in (MeshError, PlanError, PipelineError, ShardingError):
        assert issubclass(error, ValueError)
        assert issubclass(error, tx.TitanaxError)
    assert issubclass(PipelineError, PlanError)
