"""Typed run configs: YAML, overrides, `${ENV}`, type and key checks, and the
checks against devices and model that run before any compilation."""

import contextlib
import csv
import json
from pathlib import Path

import draccus
import jax
import numpy as np
import pytest

import titanax as tx
from titanax._hlo import collectives
from titanax.config import (
    Config,
    CPConfig,
    PlanConfig,
    TPConfig,
    build_run,
    config_to_dict,
    load_config,
    make_plan,
)
from titanax.parallel._ring_attention import ring_traffic_bytes

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

    # jax 0.7.2 has no public way to unregister a listener: there it stays, inert.
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    active = [True]

    def gated(event: str, duration: float, **kwargs):
        if active[0]:
            listener(event, duration, **kwargs)

    jax.monitoring.register_event_duration_secs_listener(gated)
    try:
        yield
    finally:
        active[0] = False
        if unregister is not None:
            unregister(gated)
    assert compiled == [], f"compiled before the config error: {compiled}"


# `GPT` with DP=2 x CP=4 instead of DP=2 x TP=4.
CP4 = ["plan.tp=null", "plan.cp={axis: context}", "mesh={data: 2, context: 4}"]
# A factory without a `layout` keyword (the MLP preset's, named as a factory).
MLP_FACTORY = [
    "model.preset=null",
    "model.factory=titanax.config._presets:mlp",
    "model.kwargs={}",
    "model.loss=models.mlp:cross_entropy_loss",
]

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
    pytest.param(
        ["checkpoint.resume=true"],
        {},
        "checkpoint.path",
        r"Expected `checkpoint.path` \(where to resume from\) with "
        r"`checkpoint.resume: true`, got none",
        id="resume-without-a-checkpoint",
    ),
    pytest.param(
        ["data.seed=-1"],
        {},
        "data.seed",
        r"Expected `data.seed` in \[0, 4294967296\), got -1",
        id="negative-data-seed",
    ),
    pytest.param(
        ["logging.peak_flops_per_device=0"],
        {},
        "logging.peak_flops_per_device",
        r"Expected `logging.peak_flops_per_device` > 0 \(FLOP/s\), got 0.0",
        id="zero-peak-flops",
    ),
    pytest.param(
        ["data.stride=0"],
        {},
        "data.stride",
        r"`data.stride` to be an integer >= 1, got 0",
        id="zero-stride",
    ),
    pytest.param(
        ["data.path=no/such/corpus.txt"],
        {},
        "data.path",
        r"Expected a token file at `no/such/corpus.txt`, found none\. \(from "
        r"`data.path`\)",
        id="missing-data-file",
    ),
    pytest.param(
        ["data.source=tokens", "data.path=train.bin", "data.dtype=float32"],
        {},
        "data.dtype",
        r"Expected a numpy integer dtype at `data.dtype`, got 'float32'",
        id="float-token-dtype",
    ),
    pytest.param(
        ["data.seq_len=64"],
        {},
        "data.seq_len",
        r"Expected `data.seq_len` <= the model's context length 16 "
        r"\(`block_size`\), got 64",
        id="window-longer-than-the-model",
    ),
    pytest.param(
        [*CP4, "plan.pp={axis: pipe}", "mesh={data: 1, context: 4, pipe: 2}"],
        {},
        "plan.cp",
        r"Expected at most one of `plan.cp` and `plan.pp`, got both",
        id="cp-with-pp",
    ),
    pytest.param(
        [*CP4, *MLP_FACTORY],
        {},
        "model.factory",
        r"Expected the factory at `model.factory` to take a `layout` keyword under "
        r"`plan.cp` \(over `context`\) .*got `mlp\(\*, key",
        id="cp-factory-without-layout",
    ),
    pytest.param(
        ["plan.tp.sequence_parallel=true", *MLP_FACTORY],
        {},
        "model.factory",
        r"to take a `layout` keyword under `plan.tp.sequence_parallel` \(over "
        r"`model`\)",
        id="sp-factory-without-layout",
    ),
    pytest.param(
        [*CP4, "model.preset=cnn", "model.kwargs={}"],
        {},
        "model.preset",
        r"got the preset `cnn`, whose factory takes no `layout`",
        id="cp-preset-without-layout",
    ),
    pytest.param(
        [*CP4, "model.kwargs.layout=mine"],
        {},
        "model.kwargs.layout",
        r"Expected no `layout` in `model.kwargs` under `plan.cp`",
        id="cp-layout-by-hand",
    ),
    pytest.param(
        [*CP4, "model.kwargs.dropout=0.1"],
        {},
        "model.kwargs.dropout",
        r"Expected `model.kwargs.dropout` to be 0 under `plan.cp`, got 0.1",
        id="cp-with-dropout",
    ),
    pytest.param(
        [*CP4, "model.kwargs.block_size=36"],
        {},
        "model.kwargs.block_size",
        r"Expected the context length \(`model.kwargs.block_size`\) to be a multiple "
        r"of 8 \(2 x `context`=4: the zigzag split cuts it into 8 chunks\), got 36",
        id="cp-context-not-a-multiple-of-2n",
    ),
    pytest.param(
        [*CP4, "data.seq_len=12"],
        {},
        "data.seq_len",
        r"\(`data.seq_len`\) to be a multiple of 8 .*got 12",
        id="cp-window-not-a-multiple-of-2n",
    ),
    pytest.param(
        ["plan.tp.sequence_parallel=true", "data.seq_len=10"],
        {},
        "data.seq_len",
        r"multiple of 4 \(sequence parallelism splits it over `model`=4\), got 10",
        id="sp-window-not-a-multiple-of-tp",
    ),
    pytest.param(
        ["data.source=function", "data.function=numpy:arange", "data.kwargs={}"],
        {},
        "data.kwargs",
        r"Expected `data.kwargs` to be the keyword arguments of `numpy:arange`",
        id="function-kwargs",
    ),
    pytest.param(
        ["data.source=function", "data.function=itertools:count"],
        {},
        "data.function",
        r"Expected a random-access source \(an object with `__len__` and "
        r"`__getitem__\(int\)`\), got count",
        id="function-returns-a-stream",
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
    for name in ("mnist_dp", "gpt_small_tp", "gpt_small_cp", "gpt_small_pp"):
        config = load_config(CONFIGS / f"{name}.yaml", env={})
        run = build_run(config, loggers=[])
        assert run.trainer.plan == run.plan
        assert isinstance(run.data, tx.data.Pipeline)
        with run.data.batches(0, run.plan, run.mesh) as batches:
            batch = next(batches)
        assert batch["x"].shape[0] == config.data.batch_size  # one process: all rows
    assert dict(run.mesh.shape) == {"data": 2, "model": 2, "pipe": 2}
    assert run.tokens_per_sample == 32  # the model's block_size


OWN_FACTORY = """
from models.gpt import GPT, GPTConfig


def make(*, key, layout=None, block_size=16):
    config = GPTConfig.preset(
        "tiny", n_head=4, vocab_size=256, block_size=block_size, layout=layout
    )
    return GPT(config, key=key)
"""


def test_cp_and_sp_sections_give_the_model_the_plans_layout(tmp_path):
    # The sections' defaults are `tx.CP`'s and `tx.TP`'s.
    assert make_plan(PlanConfig(cp=CPConfig())).cp == tx.CP()
    assert make_plan(PlanConfig(tp=TPConfig())).tp == tx.TP()
    gathered = [*CP4, "plan.cp.attention=all_gather"]
    run = build_run(load_config(GPT, gathered), loggers=[])
    assert run.plan.cp == tx.CP("context", attention="all_gather")
    layout = run.abstract_model.config.layout
    assert isinstance(layout, tx.Activations) and layout.context_size == 4
    assert layout.plan == run.plan
    assert dict(layout.mesh.shape) == {"data": 2, "context": 4}
    sp = build_run(load_config(GPT, ["plan.tp.sequence_parallel=true"]), loggers=[])
    assert sp.plan.tp is not None and sp.plan.tp.sequence_parallel
    assert sp.abstract_model.config.layout.plan == sp.plan
    # Without a sequence split the model gets no layout.
    assert build_run(load_config(GPT), loggers=[]).abstract_model.config.layout is None
    # The Llama preset, and a factory of one's own with a `layout` keyword.
    llama = ["model.preset=llama", "model.kwargs={size: tiny, vocab_size: 256}"]
    run = build_run(load_config(GPT, [*CP4, *llama]), loggers=[])
    assert type(run.abstract_model).__name__ == "Llama"
    assert run.abstract_model.config.layout.plan == run.plan
    (tmp_path / "own.py").write_text(OWN_FACTORY)
    own = [
        "model.preset=null",
        f"model.factory={tmp_path / 'own.py'}:make",
        "model.kwargs={block_size: 32}",
        "model.loss=models.gpt:gpt_loss",
    ]
    run = build_run(load_config(GPT, [*CP4, *own]), loggers=[])
    assert run.abstract_model.config.layout.plan.cp == tx.CP()
    assert run.tokens_per_sample == 32


def test_cp_config_trains_with_the_sequence_split(tmp_path):
    """`examples/configs/gpt_small_cp.yaml` (DP=2 x CP=4, a 256-byte context) through
    `tx.config.train`, the body of `titanax train`: the loss falls, and the step it
    compiled sends keys and values round the `context` ring and never moves a
    whole sequence of activations."""
    log = tmp_path / "log.csv"
    overrides = [
        "steps=20",
        "logging.every=1",
        "logging.console=none",
        f"logging.csv={log}",
    ]
    config = load_config(CONFIGS / "gpt_small_cp.yaml", overrides, env={})
    trainer = tx.config.train(config)
    with log.open() as f:
        losses = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
    assert sorted(losses) == list(range(1, 21))
    assert losses[1] > 5.0  # ~ln(256): bytes uniform at the start
    assert losses[20] < losses[1] - 1.5, losses

    # The program the Trainer ran (lowered with the same arguments: jit's cache
    # gives it back without compiling again).
    run = build_run(config, loggers=[])
    with run.data.batches(0, run.plan, run.mesh) as batches:
        batch = next(batches)
    assert trainer.state is not None
    program = trainer.train_step.compile(trainer.state, batch)
    lowered = program.lower(program.flatten(trainer.state), program.leaves(batch))
    ops = collectives(lowered.compile().as_text(), trainer.mesh)
    gpt = run.abstract_model.config
    n, rows = 4, config.data.batch_size // 2  # CP size; rows per data shard
    full = rows * gpt.block_size * gpt.n_embd * 4  # one (rows, T, C) fp32 activation
    kv_bytes = 2 * full // n  # S: one device's keys and values, (rows, T/N, C) each
    permutes = [op.bytes for op in ops if op.kind == "collective-permute"]
    assert all(op.axes == ("context",) for op in ops if op.kind == "collective-permute")
    ring = sum(b for b in permutes if b == kv_bytes // 2)  # a key or value block
    # Per layer at least: keys and values once round the ring forward, (N-1) S, and
    # their gradients home, N S; at most also the backward's second round (XLA may
    # reuse the forward's blocks across the unrolled layers instead).
    low = gpt.n_layer * (2 * n - 1) * kv_bytes
    assert low <= ring <= gpt.n_layer * ring_traffic_bytes(kv_bytes, n), ring
    # The rest: the zigzag reorders of the tokens (in) and of the last hidden states
    # (out and its gradient), half a device's block each.
    rest = sorted(b for b in permutes if b != kv_bytes // 2)
    assert rest == [rows * gpt.block_size // n // 2 * 4] * 2 + [full // n // 2] * 4
    # Besides the gradients' all-reduces, no collective moves more than 1/N of a
    # sequence: the sequence stays split.
    moved = [op.bytes for op in ops if op.kind != "all-reduce"]
    assert max(moved) * n <= full, max(moved)
    # Shown with `pytest -s`: the measured numbers.
    print(f"loss {losses[1]:.3f} -> {losses[20]:.3f}; ring bytes {ring} (>= {low})")


def test_trainer_gets_the_logging_and_profile_sections():
    overrides = [
        "logging.histograms_every=4",
        "logging.peak_flops_per_device=1.5e12",
        "profile.start=3",
        "profile.steps=2",
        "data.seq_len=8",
    ]
    run = build_run(load_config(GPT, overrides), loggers=[])
    trainer = run.trainer
    assert trainer.histograms_every == 4
    assert trainer.peak_flops_per_device == 1.5e12
    assert trainer.profile is not None
    assert (trainer.profile.start, trainer.profile.stop_at) == (3, 5)
    assert trainer.tokens_per_sample == run.tokens_per_sample == 8
    assert run.data.global_batch(0)["x"].shape == (8, 8)
    defaults = build_run(load_config(GPT), loggers=[]).trainer
    assert defaults.profile is None and defaults.histograms_every is None
    assert defaults.peak_flops_per_device is None  # the Trainer picks the rate


def test_digits_function_source_is_a_shuffled_pipeline():
    config = load_config(CONFIGS / "mnist_dp.yaml", env={})
    data = build_run(config, loggers=[]).data
    assert isinstance(data.source, tx.data.ArraySource)
    assert data.samples_per_epoch == 1797 and data.global_batch_size == 64
    # One epoch of 28 batches (1,792 samples) visits 1,792 distinct digits.
    images = data.source.arrays["x"].reshape(1797, -1)  # (N, 64)
    seen = set()
    first = data.global_batch(0)["x"].reshape(64, -1)  # (B, 64)
    assert not (first == images[:64]).all()  # shuffled, not the file's order
    for b in range(28):
        x = data.global_batch(b * 64)["x"].reshape(64, -1)  # (B, 64)
        # Each row is one source image: find it (the digits are distinct rows).
        rows = np.nonzero((images[None] == x[:, None]).all(-1))[1]
        seen.update(rows.tolist())
    assert len(seen) == 28 * 64
    assert data.metadata()["order"] == "numpy"  # an epoch under 2**16 samples


def test_text_windows_pipeline(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(200)))
    base = [f"data.path={text}", "data.seq_len=8", "data.batch_size=8"]

    def pipeline(*more):
        return build_run(load_config(GPT, [*base, *more]), loggers=[]).data

    data = pipeline("data.seed=3")
    assert isinstance(data.source, tx.data.TextWindows)
    # Non-overlapping windows of 8 + 1 bytes: starts 0, 8, ..., 184 (24 windows).
    assert data.samples_per_epoch == 24
    first = data.global_batch(16)
    assert (first["y"][:, :-1] == first["x"][:, 1:]).all()  # y is x shifted by one
    assert (first["y"] - first["x"] == 1).all()  # bytes 0..199 count up
    starts = first["x"][:, 0]
    assert set((starts % 8).tolist()) == {0}
    again = pipeline("data.seed=3").global_batch(16)
    assert (again["x"] == first["x"]).all()  # the same seed, the same batch
    other = pipeline("data.seed=4").global_batch(16)
    assert (other["x"] != first["x"]).any()
    # In order, with every start: sample g is the window at byte g.
    ordered = pipeline("data.shuffle=false", "data.stride=1")
    assert ordered.samples_per_epoch == 200 - 8
    np.testing.assert_array_equal(
        ordered.global_batch(40)["x"][:, 0], np.arange(40, 48)
    )
    # Past the first epoch, samples come from the next one (a stream without end).
    assert data.num_batches() is None
    epoch_two = data.global_batch(24)["x"][:, 0]
    assert set((epoch_two % 8).tolist()) == {0}


BAD_FILES = [
    pytest.param(
        b"0123456789",
        ["data.seq_len=16"],
        "data.path",
        r"\(from `data.path`\)",
        id="text-shorter-than-a-window",
    ),
    pytest.param(
        b"abc",
        ["data.source=tokens", "data.dtype=uint16"],
        "data.path",
        r"Expected a file of whole uint16 tokens \(a multiple of 2 bytes\), got 3 "
        r"bytes",
        id="token-file-not-whole-tokens",
    ),
]


@pytest.mark.parametrize("content, overrides, path, match", BAD_FILES)
def test_bad_data_files_fail_before_compiling(
    tmp_path, content, overrides, path, match
):
    file = tmp_path / "data.bin"
    file.write_bytes(content)
    config = load_config(GPT, [f"data.path={file}", *overrides])
    with _no_compilation():
        with pytest.raises(tx.ConfigError, match=match) as info:
            build_run(config, loggers=[])
    assert info.value.path == path
    assert info.value.suggestion
