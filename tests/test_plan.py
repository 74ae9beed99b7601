"""Plans: construction, describe, validation, warnings, and a table of bad inputs.

Every bad input raises its typed error (`MeshError`, `PlanError`, `PipelineError`,
`ShardingError`) from validation code, before anything is compiled: the table runs
each case with `jax_log_compiles` on and asserts that no "Compiling" record appears.
"""

import contextlib
import logging
import re
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import titanax as tx
from titanax._errors import MeshError, PipelineError, PlanError, ShardingError


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


# ------------------------------------------------------------------ warnings


def test_tp_rule_naming_no_parameter_axis_warns():
    plan = tx.Plan(tp=tx.TP(rules={"mlp": "model", "mpl": "model"}))
    with pytest.warns(UserWarning, match=r"TP rule `mpl` names a logical axis"):
        tx.shardings(_mlp(), plan, _mesh())
    with pytest.warns(UserWarning, match=r"Did you mean `mlp`\?"):
        plan.validate(_mesh(), _mlp())


def test_default_tp_rules_warn_only_when_none_matches():
    # `_mlp` has `mlp` but neither `heads` nor `vocab`: the defaults are fine.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.Plan(tp=tx.TP()).validate(_mesh(), _mlp())
    # A model with none of the default names: TP would shard nothing.
    model = EmbedOnly(np.zeros(8, np.float32))
    with pytest.warns(UserWarning, match="no parameter has") as record:
        tx.Plan(tp=tx.TP()).validate(_mesh(), model)
    named = sorted(str(w.message).split("`")[1] for w in record)
    assert named == ["heads", "mlp", "vocab"]  # one per default rule


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
        r"TP rule `mlp` → `data` names a mesh axis other than the TP axis `model`",
        r'Map `mlp` to "model" or None',
    ),
    (
        "tp-rule-bad-item",
        lambda: tx.TP(rules=[("mlp", "model", "extra")]),
        PlanError,
        r"TP rules map logical axis names to a mesh axis",
        r"TP\(rules=",
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
        r"Plan path rule 'blocks\[' is not a valid regex",
        r"re.search",
    ),
    (
        "path-rule-axes-string",
        lambda: tx.Plan(rules=[(r"head", "vocab")]),
        PlanError,
        r"Plan path rules are \(regex, axes\) pairs; got \('head', 'vocab'\)",
        r"rules=\[",
    ),
    (
        "non-module-model",
        lambda: tx.shardings({"w": np.zeros(4)}, tx.Plan(dp=tx.DP()), _mesh()),
        ShardingError,
        r"Expected an `eqx.Module` as the model, got dict",
        r"Plan\(rules=",
    ),
    (
        "not-a-plan",
        lambda: tx.shardings(_mlp(), tx.DP(), _mesh()),
        ShardingError,
        r"Expected a `tx.Plan`, got DP",
        r"tx.Plan\(dp=tx.DP\(\)\)",
    ),
    (
        "not-a-mesh",
        lambda: tx.shardings(_mlp(), tx.Plan(), {"data": 8}),
        ShardingError,
        r"Expected a `jax.sharding.Mesh`, got dict",
        r"tx.make_mesh",
    ),
    (
        "field-axes-string",
        lambda: tx.field(axes="embed"),
        ShardingError,
        r"`tx.field\(axes=...\)` expects a tuple of axis names, got 'embed'",
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


def test_at_least_fifteen_bad_inputs():
    assert len(BAD_INPUTS) >= 15
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
