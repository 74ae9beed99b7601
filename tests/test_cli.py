"""The `titanax` command: train (profile, TensorBoard, config beside the
checkpoints, the run header), explain (memory against the arrays placed, a mesh of 64
simulated devices), info."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from titanax._cli import main
from titanax._explain import bytes_per_device
from titanax._jobs import parse_bytes
from titanax.config import build_run, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
GPT_TP = str(ROOT / "examples" / "configs" / "gpt_small_tp.yaml")
GOLDEN = Path(__file__).with_name("golden") / "train_header.txt"


def _header_shape(text: str) -> str:
    """The header block with values masked: labels, line count, config sections."""
    block = text.split("=" * 72)[1].strip("\n").splitlines()
    out = []
    for line in block:
        if line.startswith(" "):  # a continued value: keep config section names
            section = re.match(r"\s+(\w+): ", line)
            out.append(f"  | {section.group(1)}" if section else "  |")
        else:
            out.append(line.split(":")[0] + ":")
    return "\n".join(out) + "\n"


def test_train_profile_tensorboard_checkpoint_config_header(tmp_path, capsys):
    from tensorboard.backend.event_processing import event_accumulator

    ckpt, tb, prof = tmp_path / "ckpt", tmp_path / "tb", tmp_path / "prof"
    argv = [
        "train",
        GPT_TP,
        "steps=6",
        "logging.every=2",
        "logging.console=basic",
        f"logging.tensorboard={tb}",
        f"logging.csv={tmp_path / 'log.csv'}",
        "logging.histograms_every=2",
        f"checkpoint.path={ckpt}",
        "checkpoint.async_=false",
        "profile.start=2",
        "profile.steps=2",
        f"profile.dir={prof}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out

    # The run header: its shape is pinned (values masked), and it holds the config.
    shape = _header_shape(out)
    if os.environ.get("TITANAX_UPDATE_GOLDEN"):
        GOLDEN.write_text(shape)
    assert shape == GOLDEN.read_text()
    assert "optimizer: {name: adamw, lr: 0.003, b1: 0.9, b2: 0.95" in out
    assert re.search(r"\[startup\] place model: \d+\.\d\d s", out)
    assert out.index("[startup] place model") > out.index("=" * 72)  # below it
    losses = [float(m) for m in re.findall(r"^step \d+ \| loss ([\d.]+)", out, re.M)]
    assert len(losses) == 3 and all(np.isfinite(losses))

    # The resolved config beside the checkpoints, and in `checkpoint show`.
    expected = config_to_dict(load_config(GPT_TP, argv[2:]))
    assert json.loads((ckpt / "config.json").read_text()) == expected
    assert main(["checkpoint", "show", str(ckpt)]) == 0
    shown = capsys.readouterr().out
    config_line = next(x for x in shown.splitlines() if "config:" in x)
    assert json.loads(config_line.split("config:", 1)[1]) == expected
    assert "step:          6 of [" in shown

    # A profiler trace of the window.
    traces = list(prof.glob("plugins/profile/*/*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 1000

    # TensorBoard's own reader: scalars and per-layer histograms.
    acc = event_accumulator.EventAccumulator(str(tb), size_guidance={"histograms": 0})
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss")] == [2, 4, 6]
    read = [s.value for s in acc.Scalars("loss")]
    assert read == pytest.approx(losses, abs=1e-4)
    tags = acc.Tags()["histograms"]
    assert "param_norm" in tags and "param_norm/GPT.blocks.w_mlp_in" in tags
    hist = acc.Histograms("param_norm/GPT.blocks.w_mlp_in")
    assert [h.step for h in hist] == [2, 4, 6]
    assert hist[0].histogram_value.num == 2  # one norm per stacked layer (n_layer=2)
    assert "startup/place_model_s" in acc.Tags()["scalars"]


def test_explain_memory_matches_the_placed_arrays(capsys):
    overrides = ["data.batch_size=8"]
    assert main(["explain", GPT_TP, *overrides, "--json", "--device-memory=1MB"]) == 0
    report = json.loads(capsys.readouterr().out)

    # What the Trainer places: the state's arrays and one batch, on device 0.
    run = build_run(load_config(GPT_TP, overrides), loggers=[])
    state = run.trainer.init_state()
    host_batch = next(run.data.batches(0, run.plan, run.mesh))
    program = run.trainer.train_step.compile(state, host_batch)
    batch = program.place(host_batch)
    device = jax.devices()[0]

    def on_device(arrays):
        return sum(
            s.data.nbytes
            for x in arrays
            for s in x.addressable_shards
            if s.device == device
        )

    state_bytes = on_device(program.flatten(state))
    batch_bytes = on_device(jax.tree.leaves(batch))
    assert state_bytes == bytes_per_device(program.flatten(state))
    memory = report["memory"]
    # jax.jit drops arguments the step never reads (`keep_unused=False`): at most a
    # few int32 scalars of the state's bookkeeping.
    unused = state_bytes + batch_bytes - memory["arguments"]
    assert 0 <= unused <= 16, (memory, state_bytes, batch_bytes)
    assert unused % 4 == 0
    # The new state is written over the donated old one (less what was dropped).
    assert memory["aliased"] == state_bytes - unused
    # Outputs: the new state, one float32 scalar per metric, and (XLA's CPU backend)
    # the result tuple's table of 8-byte buffer pointers.
    n_out = report["output_arrays"]
    n_metrics = n_out - len(program.flatten(state))
    assert n_metrics == 4  # loss, accuracy, grad_norm, lr
    assert memory["outputs"] == state_bytes + 4 * n_metrics + 8 * n_out
    assert report["fits"] is (memory["peak"] <= 1_000_000)
    assert report["flops_per_step"] == report["flops_per_device"] * 8


@pytest.mark.slow
def test_explain_on_64_simulated_devices():
    cmd = [
        sys.executable,
        "-m",
        "titanax",
        "explain",
        GPT_TP,
        "mesh={data: 16, model: 4}",
        "--devices",
        "64",
        "--device-memory",
        "80GB",
    ]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Mesh: data=16 x model=4" in done.stdout
    assert re.search(
        r"FLOPs per step: [\d.e+]+ per device, [\d.e+]+ over 64 devices", done.stdout
    )
    assert "Device memory: the step fits in 80.000 GB per device" in done.stdout


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(Exception, match="memory size such as `80GB`"):
        parse_bytes("lots")


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "devices:   8 x cpu" in out
    assert "processes: 1 (this is process 0)" in out
    assert "cluster:   single: process 0 of 1" in out


def test_bad_config_exits_1_with_the_key(tmp_path, capsys):
    assert main(["train", GPT_TP, "optimiser.lr=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown key `optimiser`. Did you mean `optimizer`?" in err
    assert "Fix: Rename it to `optimizer`." in err
