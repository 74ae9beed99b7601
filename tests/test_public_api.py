"""`import titanax as tx` exposes the documented names, each with a docstring.

To document a new public name, add it to `DOCUMENTED` below.
"""

import dataclasses
import inspect
from pathlib import Path

import pytest

import titanax as tx

DOCUMENTED = [
    # axes and sharding
    "field",
    "logical_axes",
    "shardings",
    "shard",
    "init",
    "explain",
    "Explanation",
    # mesh
    "make_mesh",
    "MeshSpec",
    "simulate_cpu_devices",
    # plans
    "Plan",
    "DP",
    "FSDP",
    "TP",
    "PP",
    "CP",
    # activations: the layout a model calls (context and sequence parallelism)
    "Activations",
    # errors
    "TitanaxError",
    "MeshError",
    "PlanError",
    "ShardingError",
    "ModelError",
    "CollectiveError",
    "CheckpointError",
    "TrainerError",
    "PipelineError",
    "ConfigError",
    "ArgumentError",
    "BatchError",
    "StepFailedError",
    "NonFiniteError",
    "DataExhaustedError",
    "DataExhaustedWarning",
    "SkippedStepsWarning",
    "Preempted",
    # jobs: configs, distributed start-up, quickstart Trainers
    "config",
    "distributed",
    "quickstart",
    # training
    "Trainer",
    "TrainState",
    "TrainStep",
    "CompiledStep",
    "make_train_step",
    "put_batch",
    "Precision",
    "configure_allocator",
    "optim",
    "loggers",
    # checkpoints
    "OrbaxCheckpoint",
    "abstract_state",
    "PreemptionGuard",
    # explicit SPMD
    "collectives",
    "spmd",
    "spmd_specs",
    "value_and_grad",
    "grad",
    # pipelines
    "Stage",
    "pipeline_schedule",
    "Schedule",
]

ERRORS = [
    "MeshError",
    "PlanError",
    "ShardingError",
    "ModelError",
    "CollectiveError",
    "CheckpointError",
    "TrainerError",
    "PipelineError",
    "ConfigError",
    "ArgumentError",
    "BatchError",
    "StepFailedError",
    "NonFiniteError",
    "DataExhaustedError",
]


def _public_names():
    return sorted(
        name
        for name in dir(tx)
        if not name.startswith("_") and not inspect.ismodule(getattr(tx, name))
    )


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_name_is_exposed(name):
    assert hasattr(tx, name), f"`tx.{name}` is documented but missing"


@pytest.mark.parametrize("name", _public_names())
def test_public_name_has_docstring(name):
    obj = getattr(tx, name)
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"`tx.{name}` has no docstring"


def _public_methods():
    for name in _public_names():
        obj = getattr(tx, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        fields = (
            {f.name for f in dataclasses.fields(obj)}
            if dataclasses.is_dataclass(obj)
            else set()
        )
        for attr, value in vars(obj).items():
            if attr.startswith("_") or attr in fields:  # a field's default value
                continue
            if isinstance(value, property | classmethod | staticmethod):
                yield f"{name}.{attr}"
            elif inspect.isfunction(value):
                yield f"{name}.{attr}"


@pytest.mark.parametrize("qualname", list(_public_methods()))
def test_public_method_has_docstring(qualname):
    cls, attr = qualname.split(".")
    value = inspect.getattr_static(getattr(tx, cls), attr)
    if isinstance(value, classmethod | staticmethod):
        value = value.__func__
    doc = value.__doc__
    assert doc and doc.strip(), f"`tx.{qualname}` has no docstring"


@pytest.mark.parametrize("name", ERRORS)
def test_errors_share_a_base_and_carry_a_suggestion(name):
    error = getattr(tx, name)
    assert issubclass(error, tx.TitanaxError)
    raised = error("what went wrong", suggestion="what to do", path="MLP.w_in")
    assert raised.message == "what went wrong"
    assert raised.suggestion == "what to do"
    assert raised.path == "MLP.w_in"
    assert str(raised) == "what went wrong (at `MLP.w_in`)\nFix: what to do"


def test_version():
    assert isinstance(tx.__version__, str) and tx.__version__


API_PAGE = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


@pytest.mark.parametrize("name", _public_names())
def test_public_name_has_an_api_entry(name):
    assert f"::: titanax.{name}\n" in API_PAGE, f"docs/api.md lacks `tx.{name}`"
