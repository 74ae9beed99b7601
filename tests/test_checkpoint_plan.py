"""Restore planning without Orbax: which saved leaves a restore reads, keeps, ignores.

`_restore_plan.plan` pairs a target's leaves with a step's saved leaves (shapes and
dtypes as Orbax's metadata gives them) and raises on every mismatch before any file
is read. Plain `ShapeDtypeStruct`s and dicts here: no checkpoint, no devices.
"""

import jax
import numpy as np
import pytest

import titanax as tx
from titanax.checkpoint._restore_plan import SavedLeaf, TargetLeaf, allowed, plan

F32 = np.dtype("float32")


def saved(**shapes):
    """Saved leaves keyed like Orbax: `model__w=(4, 2)` → ("model", "w")."""
    return {
        tuple(name.split("__")): SavedLeaf(
            shape, F32, "TrainState." + name.replace("__", ".")
        )
        for name, shape in shapes.items()
    }


def target(real=True, **shapes):
    return [
        TargetLeaf(
            tuple(name.split("__")),
            "TrainState." + name.replace("__", "."),
            jax.ShapeDtypeStruct(shape, F32),
            real,
        )
        for name, shape in shapes.items()
    ]


STATE = dict(model__w=(4, 2), model__b=(2,), opt__mu__w=(4, 2), step=())


def test_same_leaves_read_everything():
    todo = plan(target(**STATE), saved(**STATE), step=3, where="/run")
    assert sorted(todo.read) == sorted(saved(**STATE))
    assert todo.whole and todo.kept == [] and todo.ignored == []


def test_shape_mismatch_names_the_leaf_both_shapes_and_the_command():
    wider = dict(STATE, model__w=(4, 3))
    with pytest.raises(tx.CheckpointError) as info:
        plan(target(**wider), saved(**STATE), step=3, where="/run")
    message = str(info.value)
    assert "Checkpoint step 3 holds `TrainState.model.w` with shape (4, 2)" in message
    assert "target has shape (4, 3)" in message
    assert "titanax checkpoint show /run --step 3" in message
    assert info.value.path == "TrainState.model.w"


def test_dtype_mismatch_is_an_error():
    leaf = TargetLeaf(
        ("step",), "TrainState.step", jax.ShapeDtypeStruct((), "int32"), True
    )
    with pytest.raises(tx.CheckpointError, match="dtype float32.*dtype int32"):
        plan([leaf], saved(step=()), step=1, where="/run")


def test_missing_and_extra_are_listed_unless_allowed():
    new_opt = dict(model__w=(4, 2), model__b=(2,), opt__trace__w=(4, 2), step=())
    with pytest.raises(tx.CheckpointError) as info:
        plan(target(**new_opt), saved(**STATE), step=3, where="/run")
    message = str(info.value)
    assert (
        "1 target leaf(s) missing from the checkpoint: `TrainState.opt.trace.w`"
        in message
    )
    assert "1 saved leaf(s) the target lacks: `TrainState.opt.mu.w`" in message
    todo = plan(
        target(**new_opt),
        saved(**STATE),
        step=3,
        where="/run",
        allow_missing=[r"opt\.trace"],
        allow_extra=True,
    )
    assert todo.kept == [("opt", "trace", "w")]
    assert todo.ignored == [("opt", "mu", "w")]
    assert not todo.whole
    with pytest.raises(tx.CheckpointError, match="must come from the target"):
        plan(
            target(real=False, **new_opt),
            saved(**STATE),
            step=3,
            where="/run",
            allow_missing=True,
            allow_extra=True,
        )


def test_partial_restore_reads_the_model_and_keeps_the_rest():
    fresh = dict(model__w=(4, 2), model__b=(2,), opt__trace__w=(4, 2), step=())
    todo = plan(target(**fresh), saved(**STATE), step=3, where="/run", scope=("model",))
    assert sorted(todo.read) == [("model", "b"), ("model", "w")]
    assert sorted(todo.kept) == [("opt", "trace", "w"), ("step",)]
    assert sorted(todo.ignored) == [("opt", "mu", "w"), ("step",)]


def test_restore_model_reads_under_the_prefix():
    model = [
        TargetLeaf(("model", "w"), "MLP.w", jax.ShapeDtypeStruct((4, 2), F32), False),
        TargetLeaf(("model", "b"), "MLP.b", jax.ShapeDtypeStruct((2,), F32), False),
    ]
    todo = plan(model, saved(**STATE), step=3, where="/run", prefix=("model",))
    assert sorted(todo.read) == [("model", "b"), ("model", "w")]
    assert todo.kept == [] and sorted(todo.ignored) == [("opt", "mu", "w"), ("step",)]


def test_no_target_reads_every_saved_leaf_as_a_host_array():
    todo = plan(None, saved(**STATE), step=3, where="/run")
    assert sorted(todo.read) == sorted(saved(**STATE))
    assert all(leaf.abstract is None for leaf in todo.read.values())


def test_allow_patterns_are_checked():
    assert allowed(True, "allow_extra")("anything")
    assert not allowed((), "allow_extra")("anything")
    assert allowed([r"mu\.", "nu"], "allow_extra")("opt.nu.w")
    with pytest.raises(tx.CheckpointError, match=r"`allow_missing` expects True or"):
        allowed(["("], "allow_missing")
