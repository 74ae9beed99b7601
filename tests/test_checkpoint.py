"""Checkpoints: exact round trips, resharding, partial restore, damage, CLI.

8 simulated CPU devices (conftest). Subprocess tests (resume after SIGKILL/SIGTERM,
kill during save) are in `test_checkpoint_resume.py`.
"""

import importlib.metadata
import json
import os
import shutil
import signal
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import titanax as tx
from models.mlp import MLP, cross_entropy_loss
from titanax._cli import main as cli
from titanax.checkpoint import (
    OrbaxCheckpoint,
    PreemptionGuard,
    fingerprint_host,
    read_metadata,
)
from titanax.optim import adamw
from titanax.train import Precision, TrainState, abstract_state, make_train_step

# Reading a damaged step makes Orbax close its event loop with TensorStore reads in
# flight; their callbacks report "Event loop is closed" through sys.unraisablehook,
# sometimes later, during another read. The library drops those it sees while it
# handles the damage (`_drain_orphaned_reads`); any straggler is noise, not a bug.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)

IN, OUT, HIDDEN = 16, 8, (32, 32)
ADAM = adamw(1e-2)


def make_model(key):
    return MLP(IN, OUT, HIDDEN, key=key)


def batch(i=0, rows=16):
    rng = np.random.default_rng(i)
    return {
        "x": rng.standard_normal((rows, IN)).astype(np.float32),
        "y": rng.integers(0, OUT, rows).astype(np.int32),
    }


# Named layouts on the 8 devices: (mesh axes, plan).
LAYOUTS = {
    "dp8": (dict(data=8), tx.Plan(dp=tx.DP())),
    "dp2_tp4": (dict(data=2, model=4), tx.Plan(dp=tx.DP(), tp=tx.TP())),
    "tp8": (dict(model=8), tx.Plan(tp=tx.TP())),
    "fsdp8": (dict(data=8), tx.Plan(fsdp=tx.FSDP(min_size=16))),
    "single": (dict(data=1), tx.Plan()),
}


def layout(name):
    axes, plan = LAYOUTS[name]
    devices = jax.devices()[:1] if name == "single" else None
    return plan, tx.make_mesh(devices, **axes)


def host(tree):
    """Every array of `tree` as numpy, in leaf order."""
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def assert_same_values(a, b):
    ha, hb = host(a), host(b)
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def train(plan, mesh, steps=2, **kwargs):
    """A TrainState after `steps` steps (so Adam's moments are not zeros)."""
    step = make_train_step(cross_entropy_loss, ADAM, plan, mesh, **kwargs)
    state = step.init(make_model, 0)
    for i in range(steps):
        state, _ = step.step(state, batch(i))
    return state


@pytest.fixture(scope="module")
def trained():
    """A state trained 2 steps on DP8, and its host copy (the ground truth)."""
    plan, mesh = layout("dp8")
    state = train(plan, mesh)
    return state, host(state)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """A checkpoint directory holding `trained` at step 2 (saved on DP8)."""
    path = tmp_path_factory.mktemp("saved")
    plan, mesh = layout("dp8")
    with OrbaxCheckpoint(path, config={"lr": 1e-2, "name": "mlp"}) as ckpt:
        assert ckpt.save(trained[0], force=True, plan=plan, mesh=mesh)
    return path


def copy_of(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


# --- round trips ------------------------------------------------------------------


def test_round_trip_is_exact_onto_abstract_and_concrete_targets(trained, saved):
    state, truth = trained
    plan, mesh = layout("dp8")
    ckpt = OrbaxCheckpoint(saved)
    assert ckpt.steps() == [2] and ckpt.latest_step() == 2
    for target in (abstract_state(make_model, plan, mesh, ADAM), state):
        restored = ckpt.restore(target)
        assert isinstance(restored, TrainState)
        for x, y in zip(host(restored), truth, strict=True):
            np.testing.assert_array_equal(x, y)
        assert int(restored.step) == 2 and int(restored.data_position) == 2 * 16
        np.testing.assert_array_equal(restored.rng, np.asarray(state.rng))
        assert restored.model.activation == state.model.activation  # static part
        for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
            assert r.sharding == s.sharding
    ckpt.close()


def test_restored_state_trains_on(trained, saved):
    """The restored state plugs into a fresh step: same next step as the original."""
    plan, mesh = layout("dp8")
    state = OrbaxCheckpoint(saved).restore(abstract_state(make_model, plan, mesh, ADAM))
    step = make_train_step(cross_entropy_loss, ADAM, plan, mesh, donate=False)
    after_restore, _ = step.step(state, batch(2))
    after_original, _ = step.step(trained[0], batch(2))
    assert_same_values(after_restore, after_original)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(precision=Precision.bf16()),
        dict(trainable=lambda path, x: "layers[0]" not in path),
    ],
    ids=["bf16", "frozen"],
)
def test_round_trip_bf16_and_partial_freezing(kwargs, tmp_path):
    plan, mesh = layout("dp2_tp4")
    state = train(plan, mesh, steps=1, **kwargs)
    truth = host(state)
    with OrbaxCheckpoint(tmp_path) as ckpt:
        ckpt.save(state, force=True)
        ckpt.wait()
        target = abstract_state(make_model, plan, mesh, ADAM, **kwargs)
        restored = ckpt.restore(target)
    for x, y in zip(host(restored), truth, strict=True):
        np.testing.assert_array_equal(x, y)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    if "trainable" in kwargs:  # frozen layer: no optimizer state saved for it
        paths = [leaf["path"] for leaf in read_metadata(tmp_path, 1)["leaves"]]
        assert "TrainState.opt_state[0].mu.layers[1].weight" in paths
        assert not any("mu.layers[0]" in p for p in paths)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("dp2_tp4", {}),
        ("single", {}),
        ("tp8", dict(precision=Precision.fp16())),  # a LossScale in the state
        ("fsdp8", dict(trainable=lambda path, x: "layers[2]" not in path)),
    ],
    ids=["dp2_tp4", "single", "tp8_fp16", "fsdp8_frozen"],
)
def test_abstract_state_matches_init(name, kwargs):
    """Same structure, shapes, dtypes and shardings as the state `init` builds."""
    plan, mesh = layout(name)
    real = make_train_step(cross_entropy_loss, ADAM, plan, mesh, **kwargs).init(
        make_model, 0
    )
    abstract = abstract_state(make_model, plan, mesh, ADAM, **kwargs)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)


def test_abstract_state_allocates_nothing_for_a_model_function():
    plan, mesh = layout("dp2_tp4")
    calls = []

    def make(key):
        calls.append(key)
        return make_model(key)

    abstract = abstract_state(make, plan, mesh, ADAM)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert all(isinstance(k, jax.core.Tracer) for k in calls)
    # A built model (what a Trainer holds) gives the same target.
    from_model = abstract_state(make_model(jax.random.key(0)), plan, mesh, ADAM)
    assert jax.tree.structure(from_model) == jax.tree.structure(abstract)
    for a, b in zip(
        jax.tree.leaves(from_model), jax.tree.leaves(abstract), strict=True
    ):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)


# --- resharding -------------------------------------------------------------------


def test_resharding_chain_is_exact(trained, tmp_path):
    """DP8 → DP2×TP4 → TP8 → FSDP8 → single device, saving and restoring each time;
    values stay bitwise equal and every array lands in the new plan's sharding."""
    state, truth = trained
    chain = ["dp8", "dp2_tp4", "tp8", "fsdp8", "single"]
    for n, (src, dst) in enumerate(zip(chain, chain[1:], strict=False)):
        path = tmp_path / f"{n}_{src}"
        plan_src, mesh_src = layout(src)
        with OrbaxCheckpoint(path) as ckpt:
            ckpt.save(state, force=True, plan=plan_src, mesh=mesh_src)
            ckpt.wait()
            plan, mesh = layout(dst)
            state = ckpt.restore(abstract_state(make_model, plan, mesh, ADAM))
        for x, y in zip(host(state), truth, strict=True):
            np.testing.assert_array_equal(x, y)
        specs = plan.partition_specs(state.model, mesh)
        for leaf, spec in zip(
            jax.tree.leaves(state.model), jax.tree.leaves(specs), strict=True
        ):
            assert leaf.sharding.mesh == mesh
            assert leaf.sharding.spec == spec, (dst, leaf.shape)
        mu = state.opt_state[0].mu  # Adam's first moment follows its parameter
        for m, p in zip(jax.tree.leaves(mu), jax.tree.leaves(state.model), strict=True):
            assert m.sharding == p.sharding
    assert len(state.model.layers[0].weight.sharding.device_set) == 1


def test_fsdp_restore_shards_what_dp_saved(saved):
    plan, mesh = layout("fsdp8")
    state = OrbaxCheckpoint(saved).restore(abstract_state(make_model, plan, mesh, ADAM))
    weight = state.model.layers[1].weight  # (32, 32): FSDP shards its largest dim
    assert weight.sharding.spec == jax.P("data", None)
    assert weight.addressable_shards[0].data.shape == (4, 32)


def test_shape_mismatch_names_the_first_path_and_both_shapes(saved):
    plan, mesh = layout("dp8")

    def wider(key):
        return MLP(IN, OUT, (64, 32), key=key)

    target = abstract_state(wider, plan, mesh, ADAM)
    with pytest.raises(tx.CheckpointError) as info:
        OrbaxCheckpoint(saved).restore(target)
    message = str(info.value)
    assert "`TrainState.model.layers[0].weight`" in message
    assert "(16, 32)" in message and "(16, 64)" in message
    assert "titanax checkpoint show" in message
    assert info.value.path == "TrainState.model.layers[0].weight"


# --- partial restore --------------------------------------------------------------


def test_restore_model_then_fine_tune_with_new_optimizer_and_frozen_set(trained, saved):
    plan, mesh = layout("dp2_tp4")
    ckpt = OrbaxCheckpoint(saved)
    skeleton = tx.shard(make_model(jax.random.key(7)), plan, mesh)
    model = ckpt.restore_model(skeleton)
    assert_same_values(model, trained[0].model)
    assert model.layers[0].weight.sharding.spec == jax.P(None, "model")
    abstract = abstract_state(make_model, plan, mesh, ADAM).model
    assert_same_values(ckpt.restore_model(abstract), trained[0].model)
    # A new optimizer (SGD with momentum) and a new frozen set train from here.
    step = make_train_step(
        cross_entropy_loss,
        optax.sgd(0.1, momentum=0.9),
        plan,
        mesh,
        trainable=lambda path, x: "layers[2]" in path,
    )
    state = step.init(model, 1)
    state, metrics = step.step(state, batch(5))
    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_array_equal(
        state.model.layers[0].weight, np.asarray(trained[0].model.layers[0].weight)
    )


def test_partial_restore_keeps_the_targets_optimizer_and_step(trained, saved):
    plan, mesh = layout("dp8")
    new_opt = optax.sgd(0.1, momentum=0.9)
    fresh = make_train_step(cross_entropy_loss, new_opt, plan, mesh).init(make_model, 3)
    restored = OrbaxCheckpoint(saved).restore(fresh, partial=True)
    assert_same_values(restored.model, trained[0].model)
    assert_same_values(restored.opt_state, fresh.opt_state)
    assert int(restored.step) == 0


def test_missing_and_extra_leaves_are_listed_unless_allowed(trained, saved):
    plan, mesh = layout("dp8")
    ckpt = OrbaxCheckpoint(saved)
    momentum = optax.sgd(0.1, momentum=0.9)
    target = make_train_step(cross_entropy_loss, momentum, plan, mesh).init(
        make_model, 3
    )
    with pytest.raises(tx.CheckpointError) as info:
        ckpt.restore(target)
    message = str(info.value)
    assert "target leaf(s) missing from the checkpoint" in message
    assert "`TrainState.opt_state[0].trace.layers[0].weight`" in message
    assert "saved leaf(s) the target lacks" in message
    assert "`TrainState.opt_state[0].mu.layers[0].weight`" in message
    assert "allow_missing" in message and "and 7 more" in message

    with pytest.raises(tx.CheckpointError, match="missing from the checkpoint"):
        ckpt.restore(target, allow_extra=True)
    restored = ckpt.restore(target, allow_missing=[r"opt_state"], allow_extra=True)
    assert_same_values(restored.model, trained[0].model)
    assert_same_values(restored.opt_state, target.opt_state)
    assert int(restored.step) == 2

    abstract = abstract_state(make_model, plan, mesh, momentum)
    with pytest.raises(tx.CheckpointError, match="must come from the target"):
        ckpt.restore(abstract, allow_missing=True, allow_extra=True)


def test_restore_without_target_gives_host_arrays(trained, saved):
    raw = OrbaxCheckpoint(saved).restore()
    weight = raw["model"]["layers"][0]["weight"]
    assert isinstance(weight, np.ndarray)
    np.testing.assert_array_equal(weight, np.asarray(trained[0].model.layers[0].weight))
    assert int(raw["step"]) == 2


# --- save policy, async, retention ------------------------------------------------


def test_every_keep_force_and_duplicates(trained, tmp_path):
    state = trained[0]
    ckpt = OrbaxCheckpoint(tmp_path, keep=2, every=2)
    saved = [s for s in range(1, 7) if ckpt.save(state, step=s)]
    assert saved == [2, 4, 6]
    assert not ckpt.save(state, step=6, force=True)  # already saved
    assert ckpt.save(state, step=7, force=True)
    ckpt.wait()
    assert ckpt.steps() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]
    ckpt.close()


def test_save_is_safe_against_donation(trained, tmp_path):
    """`save` returns before the write; the next step donates the saved buffers."""
    plan, mesh = layout("dp8")
    step = make_train_step(cross_entropy_loss, ADAM, plan, mesh)
    state = step.init(make_model, 0)
    state, _ = step.step(state, batch(0))
    before = host(state)
    ckpt = OrbaxCheckpoint(tmp_path, async_=True)
    ckpt.save(state, force=True)
    for i in range(3):  # donates (deletes) the saved arrays while the write runs
        state, _ = step.step(state, batch(i + 1))
    assert state.model.layers[0].weight is not None
    restored = ckpt.restore(abstract_state(make_model, plan, mesh, ADAM), step=1)
    for x, y in zip(host(restored), before, strict=True):
        np.testing.assert_array_equal(x, y)
    ckpt.close()


def test_metadata_is_readable_json(trained, saved):
    meta = json.loads((saved / "2" / "meta" / "metadata").read_text())
    assert meta["format"] == "titanax-checkpoint/2"
    assert meta["step"] == 2 and meta["data_position"] == 2 * 16  # samples
    assert meta["mesh"]["shape"] == {"data": 8}
    assert meta["mesh"]["axis_names"] == ["data"]
    assert meta["plan"] == "DP over `data`"
    assert meta["config"] == {"lr": 1e-2, "name": "mlp"}
    for name in ("titanax", "jax", "equinox", "optax", "orbax-checkpoint"):
        assert meta["versions"][name] != "unknown"
    first = meta["leaves"][0]
    assert first == {
        "path": "TrainState.model.layers[0].weight",
        "key": ["model", "layers", "0", "weight"],
        "shape": [16, 32],
        "dtype": "float32",
        "spec": [None, None],
        "bytes": 2048,
        "fingerprint": fingerprint_host(trained[1][0]),
    }
    assert len(meta["leaves"]) == len(trained[1])
    assert OrbaxCheckpoint(saved).metadata()["step"] == 2


def test_config_must_be_json(tmp_path):
    with pytest.raises(tx.CheckpointError, match="JSON-serialisable"):
        OrbaxCheckpoint(tmp_path, config={"fn": print})


def test_argument_errors(tmp_path, trained):
    with pytest.raises(tx.CheckpointError, match="keep"):
        OrbaxCheckpoint(tmp_path, keep=0)
    with pytest.raises(tx.CheckpointError, match="every"):
        OrbaxCheckpoint(tmp_path, every=-5)
    ckpt = OrbaxCheckpoint(tmp_path)
    with pytest.raises(tx.CheckpointError, match="found no finished step"):
        ckpt.restore(trained[0])
    with pytest.raises(tx.CheckpointError, match="has no `step` field"):
        ckpt.save({"w": trained[0].model.layers[0].weight}, force=True)
    with pytest.raises(tx.CheckpointError, match="without a `model` field"):
        ckpt.restore({"w": 1}, partial=True)
    with pytest.raises(tx.CheckpointError, match="allow_missing"):
        ckpt.restore(trained[0], allow_missing=["("])
    ckpt.save(trained[0], force=True)
    with pytest.raises(tx.CheckpointError, match=r"Expected step 5 .* \[2\]"):
        ckpt.restore(trained[0], step=5)
    no_sharding = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        eqx.filter(trained[0], eqx.is_array),
    )
    with pytest.raises(tx.CheckpointError, match="without a sharding"):
        ckpt.restore(no_sharding)
    ckpt.close()


# --- damaged steps ----------------------------------------------------------------


def _two_steps(trained, tmp_path):
    """A directory with step 1 (the trained state at step 1) and step 2."""
    path = tmp_path / "two"
    with OrbaxCheckpoint(path) as ckpt:
        ckpt.save(trained[0], step=1, force=True)
        ckpt.save(trained[0], step=2, force=True)
    return path


def _data_file(step_dir):
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated data": (lambda d: _truncate(_data_file(d)), None),
    "truncated tree metadata": (
        lambda d: _truncate(d / "state" / "_METADATA"),
        "state/_METADATA",
    ),
    "missing manifest": (
        lambda d: (d / "state" / "manifest.ocdbt").unlink(),
        "state/manifest.ocdbt",
    ),
    "truncated json": (lambda d: _truncate(d / "meta" / "metadata"), "meta/metadata"),
    "missing json": (lambda d: (d / "meta" / "metadata").unlink(), "meta/metadata"),
}


def _truncate(file):
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_step_names_step_and_file(kind, trained, tmp_path):
    path = _two_steps(trained, tmp_path)
    damage, name = DAMAGE[kind]
    if name is None:
        name = str(_data_file(path / "2").relative_to(path / "2"))
    damage(path / "2")
    plan, mesh = layout("dp8")
    target = abstract_state(make_model, plan, mesh, ADAM)
    ckpt = OrbaxCheckpoint(path)
    with pytest.raises(tx.CheckpointError) as info:
        ckpt.restore(target, step=2)
    message = str(info.value)
    assert "step 2" in message
    assert f"{path}/2/{name}" in message, message
    # "latest" skips the damaged step, with a warning, and takes step 1.
    with pytest.warns(UserWarning, match="Skipping damaged checkpoint step 2"):
        restored = ckpt.restore(target)
    assert_same_values(restored, trained[0])
    ckpt.close()


def test_every_step_damaged(trained, tmp_path):
    path = _two_steps(trained, tmp_path)
    for step in ("1", "2"):
        (path / step / "meta" / "metadata").unlink()
    with pytest.warns(UserWarning, match="Skipping"):
        with pytest.raises(tx.CheckpointError, match="Every checkpoint step"):
            OrbaxCheckpoint(path).restore(trained[0])


def test_unfinished_save_is_never_latest(trained, tmp_path):
    """An interrupted save leaves a tmp directory that is ignored (see also the
    SIGKILL test in test_checkpoint_resume.py)."""
    path = _two_steps(trained, tmp_path)
    shutil.copytree(path / "2", path / "3.orbax-checkpoint-tmp-1234")
    ckpt = OrbaxCheckpoint(path)
    assert ckpt.latest_step() == 2
    assert int(ckpt.restore(trained[0]).step) == 2
    ckpt.close()


# --- CLI --------------------------------------------------------------------------


def test_cli_ls_and_show(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path)
    assert cli(["checkpoint", "ls", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 step(s)" in out
    row = next(line for line in out.splitlines() if line.startswith("2 "))
    assert "data=8" in row and "DP over `data`" in row and "KiB" in row

    assert cli(["checkpoint", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step:          2 of [2]" in out
    orbax = f"orbax-checkpoint {importlib.metadata.version('orbax-checkpoint')}"
    assert '"name": "mlp"' in out and orbax in out
    line = next(x for x in out.splitlines() if "opt_state[0].mu.layers[1].weight" in x)
    assert "(32, 32)" in line and "float32" in line and "P(None, None)" in line
    assert cli(["checkpoint", "show", str(path), "--step", "2"]) == 0
    capsys.readouterr()

    assert cli(["checkpoint", "show", str(path), "--step", "9"]) == 1
    assert "Expected step 9" in capsys.readouterr().err
    (path / "2" / "meta" / "metadata").write_text("{not json")
    (path / "7.orbax-checkpoint-tmp-99").mkdir()
    assert cli(["checkpoint", "ls", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "7.orbax-checkpoint-tmp-99" in out
    assert cli(["checkpoint", "ls", str(tmp_path / "nothing")]) == 1
    with pytest.raises(SystemExit):
        cli(["checkpoint"])


def test_cli_shows_tp_shardings(saved, tmp_path, capsys):
    plan, mesh = layout("dp2_tp4")
    state = OrbaxCheckpoint(saved).restore(abstract_state(make_model, plan, mesh, ADAM))
    with OrbaxCheckpoint(tmp_path) as ckpt:
        ckpt.save(state, force=True, plan=plan)
    assert cli(["checkpoint", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "data=2 x model=4" in out
    line = next(x for x in out.splitlines() if "model.layers[0].weight" in x)
    assert "P(None, 'model')" in line


# --- interop: plain Orbax + Equinox, no Titanax trainer --------------------------


def test_interop_recipe_reads_with_plain_orbax(trained, saved):
    """The recipe in docs/checkpoints.md."""
    state = trained[0]
    # --- recipe ---
    plan, mesh = layout("dp8")
    abstract = abstract_state(make_model, plan, mesh, ADAM)  # or build by hand
    arrays, static = eqx.partition(
        abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )
    restored = ocp.StandardCheckpointer().restore(saved / "2" / "state", arrays)
    state_again = eqx.combine(restored, static)
    # --- end ---
    assert_same_values(state_again, state)
    # Without any target: nested dicts of arrays, keyed like the TrainState.
    with pytest.warns(UserWarning, match="Sharding info not provided"):
        raw = ocp.PyTreeCheckpointer().restore(saved / "2" / "state")
    np.testing.assert_array_equal(
        raw["model"]["layers"][0]["weight"], np.asarray(state.model.layers[0].weight)
    )


# --- preemption -------------------------------------------------------------------


def test_preemption_guard_sets_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_preemption_guard_second_signal_goes_to_the_old_handler():
    calls = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        with PreemptionGuard(signals=[signal.SIGUSR1]) as guard:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.requested and calls == []
            os.kill(os.getpid(), signal.SIGUSR1)
            assert calls == [signal.SIGUSR1]
        guard.request()
        assert guard.signal == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_no_pickle_anywhere_in_the_library():
    root = Path(tx.__file__).parent
    hits = [
        str(p) for p in root.rglob("*") if p.is_file() and b"pickle" in p.read_bytes()
    ]
    assert hits == []
