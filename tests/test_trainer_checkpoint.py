"""The Trainer with checkpoints: exact resume, SIGTERM and Ctrl-C save the last step."""

import os
import signal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titanax as tx

pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


class _MLP(eqx.Module):
    w1: jax.Array
    w2: jax.Array

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.w1 = jax.random.normal(k1, (8, 16)) * 0.3
        self.w2 = jax.random.normal(k2, (16, 2)) * 0.3

    def __call__(self, x):
        return jnp.tanh(x @ self.w1) @ self.w2


def _loss(model, batch, key):
    # Dropout makes the RNG stream part of what must resume exactly.
    h = jnp.tanh(batch["x"] @ model.w1)
    h = jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h / 0.8, 0.0)
    return jnp.mean((h @ model.w2 - batch["y"]) ** 2)


def _data(n=12):
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(16, 8)).astype(np.float32),
            "y": rng.normal(size=(16, 2)).astype(np.float32),
        }
        for _ in range(n)
    ]


def _trainer(path=None, hooks=(), every=4):
    checkpoint = tx.OrbaxCheckpoint(path, every=every) if path is not None else None
    return tx.Trainer(
        _MLP,
        tx.Plan(dp=tx.DP()),
        optimizer=tx.optim.adamw(1e-2),
        loss=_loss,
        checkpoint=checkpoint,
        hooks=hooks,
        log_every=1,
        seed=3,
    )


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted():
    return _trainer().fit(_data(), steps=12)


def test_resume_equals_uninterrupted_run(tmp_path, uninterrupted):
    first = _trainer(tmp_path).fit(_data(), steps=7)
    assert int(first.step) == 7
    resumed_trainer = _trainer(tmp_path)
    assert resumed_trainer.checkpoint.latest_step() == 7  # forced save at the end
    resumed = resumed_trainer.fit(_data(), steps=12, resume=True)  # a total
    assert int(resumed.step) == 12 and int(resumed.data_position) == 12 * 16
    _assert_same(resumed.model, uninterrupted.model)
    _assert_same(resumed.opt_state, uninterrupted.opt_state)


def test_sigterm_saves_the_step_and_resumes_exactly(tmp_path, uninterrupted):
    def preempt_at_6(step, metrics, trainer):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = _trainer(tmp_path, hooks=[preempt_at_6])
    with pytest.raises(tx.Preempted) as e:
        trainer.fit(_data(), steps=12)
    assert e.value.step == 6 and e.value.code == 75  # SystemExit: exit code 75
    assert int(trainer.state.step) == 6 and trainer.stop_reason == "preempted"
    checkpoint = tx.OrbaxCheckpoint(tmp_path)
    assert checkpoint.latest_step() == 6
    resumed = _trainer(tmp_path).fit(_data(), steps=12, resume=True)
    _assert_same(resumed.model, uninterrupted.model)


def test_keyboard_interrupt_saves_last_step(tmp_path):
    def data():
        for i, batch in enumerate(_data()):
            if i == 5:
                raise KeyboardInterrupt
            yield batch

    trainer = _trainer(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(data(), steps=12)
    assert int(trainer.state.step) == 5
    assert tx.OrbaxCheckpoint(tmp_path).latest_step() == 5


def test_resume_from_a_path(tmp_path, uninterrupted):
    _trainer(tmp_path).fit(_data(), steps=4)
    resumed = _trainer().fit(_data(), steps=12, resume=str(tmp_path))
    _assert_same(resumed.model, uninterrupted.model)


def test_resume_without_checkpoint_is_an_error():
    with pytest.raises(tx.ArgumentError, match="Expected a checkpoint to resume"):
        _trainer().fit(_data(), steps=1, resume=True)


def test_resume_from_a_path_without_checkpoints_is_an_error(tmp_path):
    trainer = _trainer()
    with pytest.raises(tx.CheckpointError, match="Expected a checkpoint directory"):
        trainer.fit(_data(), steps=1, resume=str(tmp_path / "typo"))
    assert trainer.state is None or int(trainer.state.step) == 0


def test_resume_true_on_an_empty_directory_starts_fresh_and_says_so(
    tmp_path, uninterrupted
):
    with pytest.warns(UserWarning, match="no checkpoint .* yet; starting from step 0"):
        state = _trainer(tmp_path).fit(_data(), steps=12, resume=True)
    _assert_same(state.model, uninterrupted.model)


def test_an_iterator_that_raises_leaves_a_checkpoint_of_the_last_good_step(tmp_path):
    def data():
        for i, batch in enumerate(_data()):
            if i == 5:
                raise OSError("disk read failed")
            yield batch

    trainer = _trainer(tmp_path)
    with pytest.raises(OSError, match="disk read failed") as e:
        trainer.fit(data(), steps=12)
    assert any("data iterator raised after 5 batches" in n for n in e.value.__notes__)
    assert int(trainer.state.step) == 5 and trainer.stop_reason == "failed"
    checkpoint = tx.OrbaxCheckpoint(tmp_path)
    assert checkpoint.latest_step() == 5
    restored = checkpoint.restore(trainer.state)
    _assert_same(restored.model, trainer.state.model)


def _pipeline(seed=0):
    arrays = {
        k: np.stack([b[k] for b in _data(6)]).reshape(-1, b_dim)
        for k, b_dim in (("x", 8), ("y", 2))
    }
    return tx.data.Pipeline(tx.data.ArraySource(arrays), 16, seed=seed)


def test_a_pipeline_resumes_at_its_sample_and_checks_its_order(tmp_path):
    whole = _trainer().fit(_pipeline(), steps=10)
    _trainer(tmp_path).fit(_pipeline(), steps=4)
    meta = tx.OrbaxCheckpoint(tmp_path).metadata(4)
    assert meta["data_position"] == 4 * 16 and meta["data"]["seed"] == 0
    resumed = _trainer(tmp_path).fit(_pipeline(), steps=10, resume=True)
    _assert_same(resumed.model, whole.model)  # read on from sample 64, in O(1)
    with pytest.warns(UserWarning, match="order changed .*seed"):
        _trainer(tmp_path).fit(_pipeline(seed=1), steps=11, resume=True)


def test_successive_fits_go_on_through_a_pipeline():
    whole = _trainer().fit(_pipeline(), steps=10)
    t = _trainer()
    t.fit(_pipeline(), steps=4)
    state = t.fit(_pipeline(), steps=10)  # from sample 64, not from 0
    assert int(state.data_position) == 10 * 16
    _assert_same(state.model, whole.model)
