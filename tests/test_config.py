"""Typed run configs: YAML, overrides, `${ENV}`, type and key checks, and the
checks against devices and model that run before any compilation."""

import contextlib
import json
from pathlib import Path

import draccus
import jax
import pytest

import titanax as tx
from titanax.config import Config, build_run, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"

GPT = {
    "model": {
        "preset": "gpt",
        "kwargs": {"size": "tiny", "n_head": 4, "vocab_size": 256},
    },
    "plan": {"dp": {"axis": "data"}, "tp": {"axis": "model"}},
    "mesh": {"data": 2, "model": 4},
    "data": {"batch_size": 8},
    "logging": {"console": "none"},
}


def test_yaml_overrides_and_env(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(
        "model: {preset: gpt, kwargs: {size: tiny}}\n"
        "optimizer:\n  lr: 1.0e-3\n  clip_norm: ${CLIP}\n"
        "data:\n  path: ${DATA_DIR:-/data}/train.txt\n  batch_size: ${BATCH}\n"
        "logging: {csv: '$${NOT_A_VAR}.csv'}\n"
        "steps: 100\n"
    )
    env = {"CLIP": "0.5", "BATCH": "32"}
    config = load_config(
        file,
        [
            "steps=20",
            "optimizer.lr=3e-4",
            "plan.tp.axis=model",
            "model.kwargs.n_head=4",
        ],
        env=env,
    )
    assert config.steps == 20
    assert config.optimizer.lr == 3e-4  # "3e-4" is text in YAML; decoded as float
    assert config.optimizer.clip_norm == 0.5  # a whole-string ${} is read as YAML
    assert config.data.batch_size == 32 and isinstance(config.data.batch_size, int)
    assert config.data.path == "/data/train.txt"  # the default after `:-`
    assert config.logging.csv == "${NOT_A_VAR}.csv"  # `$${` escapes
    assert config.plan.tp is not None and config.plan.tp.axis == "model"
    assert config.plan.dp is None
    assert config.model.kwargs == {"size": "tiny", "n_head": 4}
    # The encoded config is plain JSON and decodes back to the same config.
    data = json.loads(json.dumps(config_to_dict(config)))
    assert draccus.decode(Config, data) == config


@contextlib.contextmanager
def _no_compilation():
    """Fail if XLA compiles anything inside the block."""
    compiled = []

    def listener(event: str, duration: float, **kwargs):
        if "backend_compile" in event:
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == [], f"compiled before the config error: {compiled}"


BAD = [
    pytest.param(
        ["optimizer.lr=fast"],
        {},
        "optimizer.lr",
        r"Expected a value of the declared type at `optimizer.lr`: .*'fast'",
        id="wrong-type",
    ),
    pytest.param(
        ["steps=2.5"],
        {},
        "steps",
        r"at `steps`: Couldn't parse '2.5' into an int",
        id="float-for-int",
    ),
    pytest.param(
        ["optimizer.learning_rate=0.1"],
        {},
        "optimizer.learning_rate",
        r"unknown key `learning_rate`\. Valid keys: name, lr, ",
        id="unknown-key",
    ),
    pytest.param(
        ["optimiser.lr=0.1"],
        {},
        "optimiser",
        r"unknown key `optimiser`\. Did you mean `optimizer`\?",
        id="unknown-section-closest",
    ),
    pytest.param(
        ["plan.tp.axs=model"],
        {},
        "plan.tp.axs",
        r"unknown key `axs`\. Did you mean `plan.tp.axis`\?",
        id="unknown-nested-key-closest",
    ),
    pytest.param(
        ["precision.compute=fp8"],
        {},
        "precision.compute",
        r"at `precision.compute`: Cannot convert 'fp8'",
        id="bad-literal",
    ),
    pytest.param(
        ["data.path=${NO_SUCH_VAR}"],
        {},
        "data.path",
        r"environment variable `NO_SUCH_VAR` to be set for `data.path`",
        id="missing-env-var",
    ),
    pytest.param(
        ["data.batch_size=0"],
        {},
        "data.batch_size",
        r"`data.batch_size` to be an integer >= 1, got 0",
        id="batch-size-zero",
    ),
    pytest.param(
        ["plan.tp.axis=modle"],
        {},
        "mesh",
        r"`plan.tp` uses mesh axis `modle`, but the mesh has axes \('data', "
        r"'model'\)\. Did you mean `model`\?",
        id="plan-axis-not-in-mesh",
    ),
    pytest.param(
        ["mesh={data: 3, model: 4}"],
        {},
        "mesh",
        r"12",
        id="mesh-does-not-fit-devices",
    ),
    pytest.param(
        ["model.kwargs.n_head=3", "model.kwargs.n_embd=48", "mesh={data: 1, model: 8}"],
        {},
        "plan",
        r"model.*\(size 8\)",
        id="plan-does-not-fit-model",
    ),
    pytest.param(
        ["data.batch_size=7"],
        {},
        "data.batch_size",
        r"`data.batch_size` to be a multiple of 2",
        id="batch-not-divisible",
    ),
    pytest.param(
        ["model.preset=gtp"],
        {},
        "model.preset",
        r"preset name at `model.preset`, got 'gtp'",
        id="unknown-preset",
    ),
    pytest.param(
        ["model.preset=null", "model.factory=models.gpt:NoSuchThing"],
        {},
        "model.factory",
        r"Expected `models.gpt` to define `NoSuchThing`",
        id="bad-import-path",
    ),
]


@pytest.mark.parametrize("overrides, env, path, match", BAD)
def test_bad_configs_fail_before_compiling(overrides, env, path, match):
    with _no_compilation():
        with pytest.raises(tx.ConfigError, match=match) as info:
            build_run(load_config(GPT, overrides, env=env), loggers=[])
    assert info.value.path == path
    assert info.value.suggestion  # every config error says what to do


def test_example_configs_load_and_build():
    for name in ("mnist_dp", "gpt_small_tp", "gpt_small_pp"):
        config = load_config(CONFIGS / f"{name}.yaml", env={})
        run = build_run(config, loggers=[])
        assert run.trainer.plan == run.plan
        batch = next(run.data.batches(0, run.plan, run.mesh))
        assert batch["x"].shape[0] == config.data.batch_size  # one process: all rows
    assert dict(run.mesh.shape) == {"data": 2, "model": 2, "pipe": 2}
    assert run.tokens_per_sample == 32  # the model's block_size


def test_text_windows_are_reproducible_and_next_token(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(200)))
    config = load_config(
        GPT, ["data.path=" + str(text), "data.seq_len=8", "data.seed=3"]
    )
    data = build_run(config, loggers=[]).data
    first = data.global_batch(5)
    assert (first["y"][:, :-1] == first["x"][:, 1:]).all()  # y is x shifted by one
    assert (first["y"] - first["x"] == 1).all()  # bytes 0..199 count up
    again = build_run(config, loggers=[]).data.global_batch(5)
    assert (again["x"] == first["x"]).all()
